"""The package version: the one place it is written.

Hatchling reads it from here when it builds (``[tool.hatch.version]`` in
``pyproject.toml``) and ``swr_cache.__version__`` imports it, so the wheel's
metadata and the running code cannot disagree.
"""

__version__ = "0.1.0.dev0"
