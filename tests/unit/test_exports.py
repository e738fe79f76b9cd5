"""The public surface is explicit, sorted and importable."""

from __future__ import annotations

import swr_cache


def test_all_is_sorted_and_importable() -> None:
    """``__all__`` is sorted and every name in it exists."""
    assert swr_cache.__all__ == sorted(swr_cache.__all__)
    for name in swr_cache.__all__:
        assert getattr(swr_cache, name) is not None


def test_private_modules_stay_private() -> None:
    """Nothing implementation-only leaks into the package namespace."""
    public = {n for n in dir(swr_cache) if not n.startswith("_")}
    modules = {
        "testing",
        "streams",
        "dynamodb",
        "metrics",
        "asgi",
    }  # importable submodules, not part of __all__
    assert public - modules <= set(swr_cache.__all__) | {"annotations"}


def test_package_ships_py_typed() -> None:
    """Type checkers see the package's annotations."""
    from importlib.resources import files

    assert files("swr_cache").joinpath("py.typed").is_file()


def test_cached_table_is_exported_and_named() -> None:
    """``DynamoTable(...).cached()`` returns a type users can import and annotate."""
    from swr_cache import CachedTable, DynamoTable

    assert "CachedTable" in swr_cache.__all__
    assert DynamoTable.cached.__annotations__["return"] in ("CachedTable", CachedTable)
    import redis.asyncio as aioredis

    cache = swr_cache.Cache(aioredis.Redis(), namespace="t")  # no I/O until entered
    assert isinstance(DynamoTable(object(), "Users", ["pk"]).cached(cache), CachedTable)
    # The docs say which one caches.
    assert "does not cache" in (DynamoTable.__doc__ or "")
