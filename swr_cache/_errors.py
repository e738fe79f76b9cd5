"""The exceptions swr_cache raises.

Every exception the package raises on purpose derives from one root, so
``except SwrCacheError`` catches them all. Errors from redis-py, msgpack or
botocore are wrapped at the boundary (``raise ... from exc``) where the package
has something to add; where a ``ValueError`` or ``RuntimeError`` is the natural
thing for a caller to catch, the class derives from that too::

    SwrCacheError
    ├── ConfigError (also ValueError)            - bad TTLs, bad options, decode_responses=True client
    ├── CacheNotEnteredError (also RuntimeError) - decorated function used before `async with cache`
    ├── CacheUnavailableError                    - `cache.ping()` got no answer from Redis in time
    ├── CodecError                               - value cannot be encoded/decoded
    ├── KeyEncodingError (also ValueError)       - key cannot be encoded (unsupported key type, bad template)
    ├── InvalidationError                        - an invalidation/purge could not be applied; carries `.keys`
    └── StreamRecordError (also ValueError)      - malformed DynamoDB stream record
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CacheNotEnteredError",
    "CacheUnavailableError",
    "CodecError",
    "ConfigError",
    "InvalidationError",
    "KeyEncodingError",
    "StreamRecordError",
    "SwrCacheError",
]


class SwrCacheError(Exception):
    """Root of every exception raised by swr_cache."""


class ConfigError(SwrCacheError, ValueError):
    """An option is invalid: TTLs out of order, a namespace that is empty, a
    Redis client built with ``decode_responses=True``, and the like."""


class CacheNotEnteredError(SwrCacheError, RuntimeError):
    """A cached function was called on a cache that was never entered
    (``async with cache:``), so no task group exists to run refreshes in."""


class CacheUnavailableError(SwrCacheError):
    """Redis did not answer ``cache.ping()`` within the call timeout: refused,
    timed out, authentication failed, or a cluster node is down.

    Only ``ping`` raises it: reads fail open (the origin answers) whatever
    Redis does, so this is what a readiness check looks at.
    """


class CodecError(SwrCacheError):
    """A value could not be encoded to, or decoded from, the msgpack format.

    On the read path the engine treats this as a miss (counted), never as a
    failure of the request.
    """


class KeyEncodingError(SwrCacheError, ValueError):
    """A cache key could not be built: an unsupported key type, a NaN number,
    a missing template field, or a template that could not be injective."""


class InvalidationError(SwrCacheError):
    """An invalidation or purge could not be applied, typically because Redis
    is unreachable. Invalidations fail loudly: the keys listed in ``keys`` may
    still hold data that should be gone.

    Attributes:
        keys: The cache keys (or tags) whose invalidation is not known to have
            been applied, in the order they were attempted.
    """

    keys: tuple[str, ...]

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)

    def __reduce__(self) -> tuple[type[InvalidationError], tuple[str, tuple[str, ...]]]:
        # The default reduce calls cls(*args) and would drop `keys`.
        return (type(self), (str(self), self.keys))


class StreamRecordError(SwrCacheError, ValueError):
    """A DynamoDB stream record is malformed (no table ARN, no ``Keys``, an
    unsupported key type). Reported per record; it never sinks the batch."""
