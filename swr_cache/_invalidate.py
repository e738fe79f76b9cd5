"""Invalidation: entries by identity (with their leases and fences) and tags by purge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from ._errors import InvalidationError, KeyEncodingError

if TYPE_CHECKING:
    from ._engine import RedisEngine
    from ._store import Store


class Invalidator:
    """Invalidations and tag purges of one engine; they fail loudly (``InvalidationError``)."""

    def __init__(self, engine: RedisEngine) -> None:
        self.engine = engine
        self.keys = engine.keys
        self.slots = engine.slots
        self.counts = engine.counts
        self.fence_ms = engine.fence_ms
        self.tag_stamp_ms = engine.tag_stamp_ms
        self.invalidation_wait = engine.invalidation_wait

    @property
    def store(self) -> Store:
        return self.engine.store

    async def invalidate(self, identities: Sequence[str], tags: Sequence[str] = ()) -> None:
        """Invalidate entries by identity and purge tags, failing loudly."""
        ks = self.keys
        triples = [(ks.entry(i), ks.lease(i), ks.fence(i)) for i in identities]
        try:
            async with self.slots.hold(self.invalidation_wait):
                await self.store.invalidate(triples, self.fence_ms)
            self.engine.detach(t[0] for t in triples)
            if tags:
                await self.purge(tags)
        except (RedisError, OSError) as exc:
            raise InvalidationError(
                f"could not invalidate {len(triples)} entries / {len(tags)} tags: {exc}",
                keys=[t[0] for t in triples],
            ) from exc
        self.counts["invalidations"] += len(triples)

    async def purge(self, tags: Sequence[str]) -> None:
        ks = self.keys
        gen_keys = [ks.tag_gen(t) for t in tags]
        member_keys = [ks.tag_members(t) for t in tags]
        # Stamp first, members second: a fill either sees the stamp (newer
        # than its load's start) when it checks, or is already a member we delete.
        counts = self.counts
        async with self.slots.hold(self.invalidation_wait):
            _, broken_stamps = await self.store.mark_purged(gen_keys, self.tag_stamp_ms)
            member_sets, broken_sets = await self.store.tag_members(member_keys)
        counts["tag_keys_repaired"] += broken_stamps + broken_sets
        triples: list[tuple[str, str, str]] = []
        for members in member_sets:
            for raw in members:
                ident = self.member_identity(raw)
                if ident is None:
                    # Not an entry key of ours (undecodable, another namespace):
                    # it cannot stand for an entry, so it must not stop the
                    # purge of those that do. Removed below with the rest.
                    counts["tag_members_dropped"] += 1
                    continue
                triples.append((ks.entry(ident), ks.lease(ident), ks.fence(ident)))
        if not any(member_sets):
            return
        async with self.slots.hold(self.invalidation_wait):
            if triples:
                await self.store.invalidate(triples, self.fence_ms)
                self.engine.detach(t[0] for t in triples)
            await self.store.remove_tag_members(member_keys, member_sets)
        counts["invalidations"] += len(triples)

    def member_identity(self, raw: bytes) -> str | None:
        """The identity a tag member names, or ``None`` if it names no entry of this cache."""
        try:
            return self.keys.identity_of(raw.decode())
        except (UnicodeDecodeError, KeyEncodingError):
            return None
