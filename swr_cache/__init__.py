"""swr_cache: Redis in front of Amazon DynamoDB for async Python APIs.

Soft and hard TTLs with stale-while-revalidate, single flight in process and
across processes (leases), no stale sets (fenced compare-and-write fills),
items as Redis hashes one field per attribute, and invalidation by key or tag.
"""

from .__about__ import __version__ as __version__
from ._cache import Cache
from ._decorators import CachedFunction, CachedItemFunction, cached, cached_item
from ._engine_api import EntryState
from ._errors import (
    CacheNotEnteredError,
    CacheUnavailableError,
    CodecError,
    ConfigError,
    InvalidationError,
    KeyEncodingError,
    StreamRecordError,
    SwrCacheError,
)
from ._keys import item_tag
from ._near import NearCache
from ._policy import Policy
from .asgi import CacheMiddleware
from .dynamodb import CachedTable, DynamoTable
from .streams import StreamConsumer, StreamInvalidator

__all__ = [
    "Cache",
    "CacheMiddleware",
    "CacheNotEnteredError",
    "CacheUnavailableError",
    "CachedFunction",
    "CachedItemFunction",
    "CachedTable",
    "CodecError",
    "ConfigError",
    "DynamoTable",
    "EntryState",
    "InvalidationError",
    "KeyEncodingError",
    "NearCache",
    "Policy",
    "StreamConsumer",
    "StreamInvalidator",
    "StreamRecordError",
    "SwrCacheError",
    "cached",
    "cached_item",
    "item_tag",
]
