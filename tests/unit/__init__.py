"""Pure tests: no server, seconds (see conftest.py)."""
