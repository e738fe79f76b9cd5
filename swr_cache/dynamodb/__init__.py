"""DynamoDB tables behind the cache: ``DynamoTable`` and its cached view.

``DynamoTable(client, "Users")`` wraps an aiobotocore ``dynamodb`` client for
one table and speaks plain Python (``Decimal``, ``set``, ``bytes``, nested
maps and lists) through boto3's ``TypeSerializer``/``TypeDeserializer``.
``table.cached(cache)`` returns a :class:`CachedTable`: reads through the
engine (one Redis hash per item, the same entry ``@cached_item`` uses for
that table and key), writes that invalidate what they change, and cached
query/scan results that item writes purge::

    users = DynamoTable(dynamodb, "Users").cached(cache, soft_ttl=30, hard_ttl=600)
    await users.get_item({"pk": "u1"}, attributes=["name"])
    await users.batch_get_item([{"pk": "u1"}, {"pk": "u2"}])
    await users.update_item({"pk": "u1"}, "SET #n = :n",
                            expression_names={"#n": "name"}, expression_values={":n": "Ada"})

Consistency. Fills read with ``ConsistentRead=True`` by default: an
eventually consistent read just after a write may return the item as it was
before it, and storing that would keep the old item for a whole TTL. A
strongly consistent read costs twice the read capacity of an eventually
consistent one (1 RCU per 4 KB instead of 0.5) and is not available on global
secondary indexes; since the cache absorbs most reads, the extra cost applies
only to fills. ``consistent_fills=False`` halves it; fills are then refused
for ``fence_ttl`` (default 1 s) after each invalidation, which is how long an
eventually consistent read is assumed to lag.

Writes that bypass the view (another service, the console, a Lambda) stay
invisible until the entry's TTL runs out, unless something invalidates it:
feed the table's stream to :class:`swr_cache.StreamInvalidator`, which purges
what the view's own writes purge (:func:`change_tags`), cached queries and
scans included.

boto3 and aiobotocore are imported only when a table is first used, so
``import swr_cache`` works without them. Install ``swr-cache[dynamodb]``: it
requires ``boto3`` beside ``aiobotocore``, and since both pin ``botocore``, the
resolver picks the boto3 release that matches aiobotocore's botocore.
"""

from __future__ import annotations

from .._keys import change_tags, item_tags, table_tag
from ._cached import CachedTable
from ._common import THROTTLE_CODES, is_throttle
from ._common import _from_dynamo as _from_dynamo
from ._common import _to_dynamo as _to_dynamo
from ._table import DynamoTable

__all__ = [
    "THROTTLE_CODES",
    "CachedTable",
    "DynamoTable",
    "change_tags",
    "is_throttle",
    "item_tags",
    "table_tag",
]
