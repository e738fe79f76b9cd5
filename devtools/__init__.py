"""Developer tools that ship with the repository, not with the package (the wheel has only ``swr_cache``).

- :mod:`devtools.devservers`: real servers for tests, benchmarks and the demo
  (redis-server, a Redis Cluster, moto, uvicorn).
- :mod:`devtools.demo`: ``make demo`` (``python -m devtools.demo``).

Importing them starts nothing and registers nothing.
"""
