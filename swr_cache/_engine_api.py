"""The internal API between the engine and its adapters.

The decorators, ``CacheMiddleware``, ``CachedTable``, the stream handlers and
the CLI talk to the engine through :class:`Engine` only: they reach it with
:func:`engine_of` and never touch a ``Cache``'s private members (ruff's
``SLF001`` holds them to that). What they may use:

- ``get``/``peek``/``refresh_now`` for one :class:`EntryRequest`, and
  ``get_many`` for a batch of them (one pipelined read, pipelined leases,
  one batch load for the misses, pipelined fills);
- ``invalidate`` and ``detach`` (after a write of their own that changes
  entries, so callers arriving later do not share an older read or load);
- ``now_ms`` (Redis server time), ``keys``, ``store`` (every Redis command
  and script), ``slots`` (the bound on commands in flight) and ``breaker``.

Nothing here is public API: names may change between releases.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from ._entry import _snap_from_item, _snap_from_result
from ._signing import M_SIG
from ._store import (
    ALL_META,
    M_DELTA,
    M_FORMAT,
    M_HARD,
    M_RESULT,
    M_SOFT,
    M_VERSION,
    WHOLE_FIELDS,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._breaker import Breaker
    from ._cache import Cache
    from ._gate import _Limiter
    from ._keys import KeySpace
    from ._metrics import Metrics, MetricsRegistry
    from ._near import NearCache
    from ._policy import Policy
    from ._signing import Signer
    from ._store import Store


__all__ = [
    "NOT_HELD",
    "Engine",
    "EntryRequest",
    "EntryState",
    "Fill",
    "LoadMany",
    "Peeked",
    "engine_of",
]

RESULT_FIELDS: Final = (M_SOFT, M_HARD, M_FORMAT, M_DELTA, M_VERSION, M_RESULT)
SIGNED_RESULT_FIELDS: Final = (*RESULT_FIELDS, M_SIG)


class EntryState(StrEnum):
    """How a cached answer stood when served (equal to the strings ``"fresh"``/``"stale"``)."""

    FRESH = "fresh"
    STALE = "stale"


class Fill:
    """What a loader may return instead of a bare value, to steer the fill.

    Args:
        value: what callers receive.
        store: ``False`` serves the value without storing it (an uncacheable
            HTTP response, say).
        policy: TTLs for this fill only (HTTP freshness from response headers).
        tags: tags known only once the value is loaded (``Surrogate-Key``).
    """

    __slots__ = ("policy", "store", "tags", "value")

    def __init__(
        self,
        value: Any,
        *,
        store: bool = True,
        policy: Policy | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        self.value = value
        self.store = store
        self.policy = policy
        self.tags = list(tags)


class EntryRequest:
    """One call's view of one entry: its keys, what it wants and how to load it.

    Built by ``Engine.request`` (keyword-only); the engine sets ``landed``,
    ``purge_floor`` and ``outcome`` as the call goes.
    """

    __slots__ = (
        "attrs",
        "consistent",
        "engine",
        "entry",
        "fields",
        "identity",
        "is_item",
        "landed",
        "loader",
        "metrics",
        "outcome",
        "parse",
        "policy",
        "purge_floor",
        "tags",
        "version_attr",
        "wait_timeout",
    )

    def __init__(
        self,
        engine: Engine,
        *,
        metrics: Metrics,
        policy: Policy,
        identity: str,
        is_item: bool,
        attrs: tuple[str, ...] | None,
        loader: Callable[[tuple[str, ...] | None], Awaitable[Any]],
        tags: Callable[[], Sequence[str]] | None = None,
        entry: str | None = None,
        consistent: bool = False,
        version_attr: str | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        self.engine = engine
        # How long this call waits for a load another call started (None: no
        # bound); past it the call raises TimeoutError with outcome "wait-timeout".
        self.wait_timeout = wait_timeout
        # The item's own version attribute: every projection load includes it
        # and a merge happens only into an entry holding the same version.
        self.version_attr = version_attr
        # The loader reads strongly consistently: a fill under a lease taken
        # after an invalidation cannot hold pre-write data, so no fence applies.
        self.consistent = consistent
        self.metrics = metrics
        self.policy = policy
        self.identity = identity
        self.entry = engine.keys.entry(identity) if entry is None else entry
        self.is_item = is_item
        self.attrs = attrs
        self.loader = loader
        # Set once this request's load has stored its fill (see Engine.flight).
        self.landed = False
        # A purge stamp this request's last load already lost to: the next load
        # only counts newer ones (see Loads.check_tags).
        self.purge_floor = 0.0
        self.tags = tags
        # How get answered: fresh, stale, miss or bypass (for tracing spans);
        # wait-timeout when a wait for another call's load passed wait_timeout.
        self.outcome = ""
        # What one read asks Redis for (``_store.Store.read_entry``): GET for
        # a whole item (WHOLE_FIELDS); GET and HMGET of these fields for a
        # projection, or GET and HGETALL (None) for a signed one; HMGET for a
        # result. How a reply of an unsigned read becomes a snapshot.
        self.parse = _snap_from_item if is_item else _snap_from_result
        if not is_item:
            signed = engine.signer is not None
            self.fields: tuple[bytes, ...] | None = (
                SIGNED_RESULT_FIELDS if signed else RESULT_FIELDS
            )
        elif attrs is None:
            self.fields = WHOLE_FIELDS
        elif engine.signer is not None:
            # A signature covers every field: signed hash entries are read whole.
            self.fields = None
        else:
            self.fields = ALL_META + tuple(a.encode() for a in attrs)

    @property
    def lease(self) -> str:
        return self.engine.keys.lease(self.identity)

    @property
    def fence(self) -> str:
        return self.engine.keys.fence(self.identity)

    @property
    def backoff(self) -> str:
        return self.engine.keys.backoff(self.identity)

    def read_fields(self) -> tuple[bytes, ...] | None:
        return self.fields


class Peeked(NamedTuple):
    """A cached answer seen without loading: the value and ``"fresh"``/``"stale"``."""

    value: Any
    state: str


# A batch loader: the requests whose leases the engine holds, and one
# projection for all (None: whole items) -> what it found, by identity.
LoadMany = Callable[
    [Sequence[EntryRequest], "tuple[str, ...] | None"], Awaitable[Mapping[str, Any]]
]


class _NotHeld:
    """``Engine.near_item``: no fresh near copy; the call goes the usual way."""


NOT_HELD: Final = _NotHeld()


class Engine(Protocol):
    """What adapters may use of a running cache (see the module docstring)."""

    namespace: str
    keys: KeySpace
    store: Store
    slots: _Limiter
    breaker: Breaker
    metrics: MetricsRegistry
    signer: Signer | None
    call_timeout: float
    # How long an invalidation waits for a slot (longer than a read: never dropped).
    invalidation_wait: float
    fence_ms: int
    max_entry_bytes: int
    near: NearCache | None

    @property
    def entered(self) -> bool: ...

    def require_entered(self) -> TaskGroup: ...

    def now_ms(self) -> float: ...

    def request(
        self,
        *,
        metrics: Metrics,
        policy: Policy,
        identity: str,
        is_item: bool,
        attrs: tuple[str, ...] | None,
        loader: Callable[[tuple[str, ...] | None], Awaitable[Any]],
        tags: Callable[[], Sequence[str]] | None = None,
        entry: str | None = None,
        consistent: bool = False,
        version_attr: str | None = None,
        wait_timeout: float | None = None,
    ) -> EntryRequest: ...

    async def get(self, req: EntryRequest) -> Any: ...

    def near_item(
        self,
        entry: str,
        metrics: Metrics,
        policy: Policy,
        request: Callable[..., EntryRequest],
        args: tuple[Any, ...],
    ) -> Any: ...

    async def peek(self, req: EntryRequest) -> Peeked | None: ...

    async def refresh_now(self, req: EntryRequest) -> Any: ...

    async def get_many(
        self, reqs: Sequence[EntryRequest], load_many: LoadMany
    ) -> tuple[dict[str, Any], int]: ...

    async def get_items(
        self,
        entries: Sequence[str],
        request: Callable[[int], EntryRequest],
        load_many: LoadMany,
        metrics: Metrics,
        policy: Policy,
    ) -> tuple[list[Any], int]: ...

    async def consistent_get(self, req: EntryRequest) -> Any: ...

    async def call_loader(self, req: EntryRequest, attrs: tuple[str, ...] | None) -> Any: ...

    def detach(self, entries: Iterable[str]) -> None: ...

    async def invalidate(self, identities: Sequence[str], tags: Sequence[str] = ()) -> None: ...

    def whole_entry(
        self,
        req: EntryRequest,
        attrs: tuple[str, ...] | None,
        value: Mapping[str, Any] | None,
        now: float,
        delta_ms: float | None,
    ) -> tuple[dict[bytes, bytes], int]: ...


def engine_of(cache: Cache) -> Engine:
    """The engine behind ``cache``: the one door adapters use into it."""
    # The one sanctioned reach into a Cache.
    return cache._engine  # noqa: SLF001
