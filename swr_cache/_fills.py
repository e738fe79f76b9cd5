"""Fills: storing a loaded value under its lease, and the tag check that follows.

A fill is a Lua compare-and-write (``_store``): it lands only while the
lease is still ours and no invalidation fence stands, and a merge only into
an entry holding the version it read. A tagged fill then joins its tags'
member sets and checks their purge stamps; a purge during the load takes the
fill back (see ``check_tags``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from . import _codec
from ._engine_api import EntryRequest
from ._entry import encode_fields, stamp_entry
from ._errors import CodecError
from ._policy import Policy
from ._store import M_ABSENT, FillOutcome

if TYPE_CHECKING:
    from ._engine import RedisEngine
    from ._store import Store

log = logging.getLogger("swr_cache")


class EntryTooLarge(Exception):
    """An entry over the cache's ``max_entry_bytes``: not stored."""


class Fills:
    """Fills and merges of one engine, and their tag bookkeeping."""

    def __init__(self, engine: RedisEngine) -> None:
        self.engine = engine
        self.keys = engine.keys
        self.slots = engine.slots
        self.backoff = engine.refresher.backoff
        self.counts = engine.counts
        self.now_ms = engine.now_ms
        self.call_timeout = engine.call_timeout
        self.invalidation_wait = engine.invalidation_wait
        self.tag_stamp_ms = engine.tag_stamp_ms
        self.compress_threshold = engine.compress_threshold
        self.max_entry_bytes = engine.max_entry_bytes

    @property
    def store(self) -> Store:
        return self.engine.store

    async def fill(
        self,
        req: EntryRequest,
        token: str,
        attrs: tuple[str, ...] | None,
        value: Any,
        merge_version: bytes | None,
        prior_absent: list[str],
        delta_ms: float,
        tags: list[str],
        start_ms: float,
        policy: Policy,
    ) -> bool:
        """Store a loaded value under the lease; True if an invalidation superseded it.

        Superseded means the lease was taken away (invalidations delete it), a
        tag was purged while the value loaded, or a merge found its entry
        replaced or holding another version: the value (or the cached
        attributes it was to join) may predate a write that has completed
        since, so it is not stored and ``_load`` loads once more.
        """
        lease = req.lease
        counts = req.metrics.counts
        merging = merge_version is not None and value is not None
        fields = self._fields(req, attrs, value, merging, prior_absent)
        if fields is None:
            await self.engine.loads.release(lease, token)
            return False
        expire_ms = policy.hard_ms
        try:
            if merging:
                assert merge_version is not None
                outcome = await self._merge(req, token, merge_version, fields)
            else:
                negative = req.is_item and value is None
                expire_ms = stamp_entry(fields, policy, negative, self.now_ms(), delta_ms)
                async with self.slots.hold(self.call_timeout):
                    outcome = await self.store.fill(
                        req.entry,
                        lease,
                        req.fence,
                        token,
                        expire_ms,
                        fields,
                        not req.consistent,
                        req.backoff,
                    )
        except (RedisError, OSError) as exc:
            counts["redis_errors"] += 1
            log.debug("swr_cache: fill failed: %r", exc)
            return False
        if outcome == FillOutcome.STORED_FENCE_REPAIRED:
            counts["fences_repaired"] += 1
            outcome = FillOutcome.STORED
        if outcome != FillOutcome.STORED:
            counts["fills_rejected"] += 1
            if outcome == FillOutcome.OUTDATED:
                counts["merges_outdated"] += 1
            # Lease taken (an invalidation) or, for a merge, the entry replaced
            # since it was read (a write-through or stream refresh) or holding
            # another version of the item: the value or the cached attributes
            # it was to join may be out of date.
            return outcome in (FillOutcome.LEASE_LOST, FillOutcome.CHANGED, FillOutcome.OUTDATED)
        counts["fills"] += 1
        req.landed = True
        if self.engine.near is not None:  # a copy read before this fill is outdated
            self.engine.near.drop((req.entry,))
        self.backoff.pop(req.entry, None)  # (the fill script ended it in Redis)
        if tags:
            return await self.check_tags(req, tags, start_ms, expire_ms)
        return False

    def _fields(
        self,
        req: EntryRequest,
        attrs: tuple[str, ...] | None,
        value: Any,
        merging: bool,
        prior_absent: list[str],
    ) -> dict[bytes, bytes] | None:
        """The fields a fill writes, or ``None`` (counted) when it cannot be stored."""
        counts = req.metrics.counts
        try:
            fields = encode_fields(
                req.is_item, attrs, value, merging, self.compress_threshold, req.version_attr
            )
            if merging and M_ABSENT in fields:
                # Known-absent names accumulate across merges.
                newly = [a for a in attrs or () if a not in value]
                fields[M_ABSENT] = _codec.encode(sorted(set(prior_absent).union(newly)))
        except CodecError as exc:
            log.warning(
                "swr_cache: %s returned a value that cannot be cached: %s", req.metrics.name, exc
            )
            counts["fills_rejected"] += 1
            return None
        if sum(len(k) + len(v) for k, v in fields.items()) > self.max_entry_bytes:
            counts["fills_skipped_too_large"] += 1
            return None
        return fields

    async def _merge(
        self, req: EntryRequest, token: str, merge_version: bytes, fields: dict[bytes, bytes]
    ) -> int:
        """Merge attributes into the entry of ``merge_version`` (and of the item's version)."""
        vname = req.version_attr
        vfield = None if vname is None else vname.encode()
        check = None if vfield is None or vfield not in fields else (vfield, fields[vfield])
        async with self.slots.hold(self.call_timeout):
            outcome: int = await self.store.merge(
                req.entry,
                req.lease,
                req.fence,
                token,
                merge_version,
                fields,
                not req.consistent,
                check,
                req.backoff,
            )
        return outcome

    async def check_tags(
        self, req: EntryRequest, tags: list[str], start_ms: float, expire_ms: int
    ) -> bool:
        """Join the tags' member sets, then undo the fill if any tag was purged since the load began."""
        ks = self.keys
        raced = True
        try:
            async with self.slots.hold(self.call_timeout):
                repaired = await self.store.add_tag_members(
                    [ks.tag_members(t) for t in tags], req.entry, expire_ms
                )
                stamps, broken = await self.store.tag_generations(
                    [ks.tag_gen(t) for t in tags], self.tag_stamp_ms
                )
            if repaired or broken:
                self.counts["tag_keys_repaired"] += repaired + broken
            newer = [s for s in stamps if s is not None and s >= start_ms]
            raced = bool(newer)
            if newer:
                # A load that starts after we saw these stamps need not lose to them again.
                req.purge_floor = max(newer) + 1
            # A purge stamp lives tag_stamp_ttl; a load older than that cannot
            # prove no purge happened during it.
            raced = raced or self.now_ms() - start_ms >= self.tag_stamp_ms
        except (RedisError, OSError, ValueError):
            pass
        if raced:
            # A purge ran while we loaded (or we cannot tell): take back what we wrote.
            req.metrics.counts["tag_races"] += 1
            try:
                async with self.slots.hold(self.invalidation_wait):
                    await self.store.delete(req.entry)
            except (RedisError, OSError) as exc:
                log.warning("swr_cache: could not remove a fill that raced a tag purge: %r", exc)
        return raced

    def whole_entry(
        self,
        req: EntryRequest,
        attrs: tuple[str, ...] | None,
        value: Mapping[str, Any] | None,
        now: float,
        delta_ms: float | None,
    ) -> tuple[dict[bytes, bytes], int]:
        """The fields of an entry that replaces ``req``'s with ``value``, and its pexpire (ms).

        The same fields and deadlines ``fill`` writes: the attributes (``attrs``
        of them as fields, or all as one blob), the soft deadline less the policy's jitter and the
        hard one (the negative TTL for ``None``), the format, a fresh version
        and, when known, how long the load took (``delta_ms``). Filled from
        batches, write-throughs and stream records.

        Raises:
            CodecError: ``value`` cannot be encoded.
            EntryTooLarge: the entry would exceed ``max_entry_bytes``.
        """
        fields = encode_fields(
            req.is_item, attrs, value, False, self.compress_threshold, req.version_attr
        )
        if sum(len(k) + len(v) for k, v in fields.items()) > self.max_entry_bytes:
            raise EntryTooLarge(req.identity)
        return fields, stamp_entry(fields, req.policy, value is None, now, delta_ms)
