"""``@cached_item`` and ``@cached``: typed wrapper objects over the engine."""

from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, Generic, ParamSpec, TypeVar, overload

from . import _otel
from ._cache import Cache
from ._engine_api import NOT_HELD, EntryRequest, engine_of
from ._entry import normalize_attributes
from ._errors import CodecError, ConfigError
from ._keys import KeyTemplate, encode_args, escape, item_identity, result_identity
from ._metrics import Metrics
from ._policy import Policy
from ._typed import ValuePlan, plan_for_return

__all__ = ["CachedFunction", "CachedItemFunction", "cached", "cached_item"]

P = ParamSpec("P")
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

_ATTRS = "attributes"
_MEMO_SIZE = 4096
_EMPTY = inspect.Parameter.empty
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _Binder:
    """Normalises a call's arguments the way ``signature.bind`` + ``apply_defaults`` would.

    Calls that pass plain positional arguments (the common case) skip
    ``inspect`` entirely; anything else goes through ``Signature.bind``.
    The ``attributes`` parameter is never part of the key.
    """

    __slots__ = (
        "_defaults",
        "_fast",
        "_n_pos",
        "_n_required",
        "has_attributes",
        "names",
        "sig",
        "single_str_fast",
    )

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.sig = inspect.signature(fn)
        params = [p for p in self.sig.parameters.values() if p.name != _ATTRS]
        self.has_attributes = _ATTRS in self.sig.parameters
        self.names = tuple(p.name for p in params)
        self._fast = all(p.kind in _POSITIONAL for p in params)
        if self.has_attributes:
            attr_param = self.sig.parameters[_ATTRS]
            # attributes must come after every key parameter for the fast path.
            if attr_param.kind in _POSITIONAL and list(self.sig.parameters).index(_ATTRS) != len(
                params
            ):
                self._fast = False
        self._n_pos = len(params)
        self._n_required = sum(1 for p in params if p.default is _EMPTY)
        self._defaults = tuple(p.default for p in params if p.default is not _EMPTY)
        if self._fast and any(
            p.default is _EMPTY for p in params[self._n_required :]
        ):  # a required parameter after one with a default
            self._fast = False
        # One positional argument binds to the only key parameter.
        self.single_str_fast = self._fast and self._n_pos == 1

    def bind(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], skip_first: bool = False
    ) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """Return ``(positional, keyword, attributes)`` for the key function."""
        if self._fast and (not kwargs or (len(kwargs) == 1 and _ATTRS in kwargs)):
            n = len(args)
            if self._n_required <= n <= self._n_pos:
                if n < self._n_pos:
                    args = args + self._defaults[n - self._n_required :]
                attributes = kwargs.get(_ATTRS) if kwargs else None
                return (args[1:] if skip_first else args), {}, attributes
        bound = self.sig.bind(*args, **kwargs)
        bound.apply_defaults()
        attributes = bound.arguments.pop(_ATTRS, None) if self.has_attributes else None
        pos: list[Any] = []
        kw: dict[str, Any] = {}
        for i, (name, value) in enumerate(bound.arguments.items()):
            if skip_first and i == 0:
                continue
            param = self.sig.parameters[name]
            if param.kind in _POSITIONAL:
                pos.append(value)
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                pos.extend(value)
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            else:
                kw[name] = value
        return tuple(pos), kw, attributes

    def arguments(
        self, pos: tuple[Any, ...], kw: Mapping[str, Any], skip_first: bool = False
    ) -> dict[str, Any]:
        """The key arguments by parameter name (for templates and default keys)."""
        names = self.names[1:] if skip_first else self.names
        out = dict(zip(names, pos, strict=False))
        if len(pos) > len(names):  # *args
            out["*"] = tuple(pos[len(names) :])
        out.update(kw)
        return out


def _describe(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return name
    return f"{name} at {code.co_filename}:{code.co_firstlineno}"


# A literal ``ConsistentRead=True`` (keyword or dict entry) in the accessor's source.
_CONSISTENT_READ = re.compile(r"""["']?ConsistentRead["']?\s*[=:]\s*True\b""")


def _reads_consistently(fn: Callable[..., Any]) -> bool:
    """Whether the accessor's source asks DynamoDB for strongly consistent reads.

    A heuristic (the call may be elsewhere), used only to warn: such an accessor
    should say ``consistent_reads=True``, or the invalidation fence, meant for
    eventually consistent reads, throws away its fills after every write.
    """
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # no source: built in a REPL, exec, a C function
        return False
    return _CONSISTENT_READ.search(source) is not None


def _caller_locals() -> Mapping[str, Any]:
    """The names where the decorator was applied (the caller of ``decorate``).

    Under ``from __future__ import annotations`` a return annotation is a
    string; classes defined in the same function body resolve only here.
    """
    try:
        # (sys._getframe is the documented way to a caller's frame.)
        return dict(sys._getframe(2).f_locals)  # noqa: SLF001
    except ValueError:  # no such frame
        return {}


def _check_item_plan(plan: ValuePlan, name: str, has_attributes: bool) -> None:
    """A typed item accessor returns one model (or None) and reads whole items."""
    from ._typed import _Dataclass, _Msgspec, _Optional, _Pydantic

    inner = plan.inner if isinstance(plan, _Optional) else plan
    if not isinstance(inner, (_Dataclass, _Pydantic, _Msgspec)):
        raise ConfigError(
            f"{name}: @cached_item stores one item per entry; its return annotation must "
            "be a mapping, or a dataclass / Pydantic model / msgspec Struct (or X | None)"
        )
    if has_attributes:
        raise ConfigError(
            f"{name}: an accessor returning a model cannot take `attributes` (a projection "
            "is not a whole model): return a dict, or drop the attributes parameter"
        )


async def _ready(value: Any) -> Any:
    """An answer known before any await (a near hit), as the coroutine callers await."""
    return value


def _policy(cache: Cache, **overrides: float | None) -> Policy:
    return cache.policy.with_overrides(**overrides)


class _Wrapper(Generic[P, T]):
    """Shared plumbing of the two decorators' wrapper objects."""

    __wrapped__: Callable[P, Awaitable[T]]

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        cache: Cache,
        name: str | None,
        table: str | None,
        localns: Mapping[str, Any] | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{fn!r} must be an async function")
        if not isinstance(cache, Cache):
            raise TypeError("the first argument must be a swr_cache.Cache")
        functools.update_wrapper(self, fn)
        self.__wrapped__ = fn
        self.cache = cache
        self.engine = engine_of(cache)
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self._binder = _Binder(fn)
        self.metrics: Metrics = cache.metrics.get(self.name, table)
        # Set when the return annotation names dataclasses, Pydantic models or
        # msgspec Structs: values are stored as their fields and rebuilt.
        self._plan: ValuePlan | None = plan_for_return(fn, localns)
        # Span attributes, when OpenTelemetry is importable.
        self._span_attributes: dict[str, str] | None = None
        if _otel.TRACER is not None:
            self._span_attributes = {_otel.ATTR_FUNCTION: self.name}
            if table is not None:
                self._span_attributes[_otel.ATTR_TABLE] = table
        # Neither typed values nor spans: calls return the engine's coroutine.
        self._direct = self._plan is None and self._span_attributes is None

    def _call(self, req: EntryRequest) -> Coroutine[Any, Any, T]:
        if self._direct:
            return self.engine.get(req)
        if self._span_attributes is not None and _otel.recording():
            return self._traced(req)
        if self._plan is None:
            return self.engine.get(req)
        return self._typed(req)

    def _traced_loader(
        self, load: Callable[[tuple[str, ...] | None], Awaitable[Any]]
    ) -> Callable[[tuple[str, ...] | None], Awaitable[Any]]:
        if self._span_attributes is None or not _otel.recording():
            return load
        return _otel.traced_loader(load, self._span_attributes)

    async def _traced(self, req: EntryRequest) -> T:
        attributes = self._span_attributes
        done = [False]
        token = _otel.CALL_DONE.set(done)
        try:
            with _otel.TRACER.start_as_current_span("swr_cache.get", attributes=attributes) as span:
                try:
                    if self._plan is None:
                        result: T = await self.engine.get(req)
                    else:
                        result = await self._typed(req)
                finally:
                    done[0] = True
                    if req.outcome:
                        span.set_attribute(_otel.ATTR_OUTCOME, req.outcome)
                return result
        finally:
            _otel.CALL_DONE.reset(token)

    async def _typed(self, req: EntryRequest) -> T:
        value = await self.engine.get(req)
        from_origin = req.outcome in ("miss", "bypass")
        try:
            return self._rebuild(value, fresh=from_origin)
        except CodecError:
            if from_origin:  # the function's own value: loading again would not help
                raise
            # Stored by an older version of the type (a field added, say): a
            # counted miss, overwritten by a fresh load.
            self.metrics.counts["decode_errors"] += 1
        return self._rebuild(await self.engine.refresh_now(req), fresh=True)

    def _rebuild(self, value: Any, fresh: bool = False) -> T:
        plan = self._plan
        if plan is None:
            result: T = value
            return result
        try:
            rebuilt: T = plan.load(value)
        except (CodecError, TypeError, ValueError) as exc:
            if fresh:
                raise CodecError(
                    f"{self.name} returned a value that cannot be rebuilt as its return "
                    f"annotation says: {exc}"
                ) from exc
            raise CodecError(str(exc)) from exc
        return rebuilt

    async def _peek_typed(self, req: EntryRequest) -> tuple[T, str] | None:
        got: tuple[Any, str] | None = await self.engine.peek(req)
        if got is None or self._plan is None:
            return got
        try:
            return self._rebuild(got[0]), got[1]
        except CodecError:
            self.metrics.counts["decode_errors"] += 1
            return None

    async def _refresh_typed(self, req: EntryRequest) -> T:
        return self._rebuild(await self.engine.refresh_now(req), fresh=True)

    def _request(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], skip_first: bool
    ) -> EntryRequest:
        raise NotImplementedError

    async def _invalidate(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], skip_first: bool
    ) -> None:
        raise NotImplementedError

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        # A plain function returning the engine's coroutine: one frame less on
        # the hit path than an ``async def`` that awaits it.
        req = self._request(args, kwargs, False)
        if self._direct:
            return self.engine.get(req)
        return self._call(req)

    async def peek(self, *args: P.args, **kwargs: P.kwargs) -> tuple[T, str] | None:
        """The cached value and its state (``"fresh"`` or ``"stale"``) without loading, or ``None``."""
        return await self._peek_typed(self._request(args, kwargs, False))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Reload from the origin now and store the result, whatever the entry's state."""
        return await self._refresh_typed(self._request(args, kwargs, False))

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> _Wrapper[P, T]: ...
    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None) -> _BoundWrapper[T]: ...
    def __get__(self, instance: object | None, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return _BoundWrapper(self, instance)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class _BoundWrapper(Generic[T]):
    """A cached method bound to its instance; the instance is not part of the key."""

    __slots__ = ("_instance", "_wrapper")

    def __init__(self, wrapper: _Wrapper[Any, T], instance: object) -> None:
        self._wrapper = wrapper
        self._instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, T]:
        w = self._wrapper
        # (A bound view is part of its wrapper: it uses the wrapper's own steps.)
        return w._call(w._request((self._instance, *args), kwargs, True))  # noqa: SLF001

    async def peek(self, *args: Any, **kwargs: Any) -> tuple[T, str] | None:
        w = self._wrapper
        return await w._peek_typed(w._request((self._instance, *args), kwargs, True))  # noqa: SLF001

    async def refresh(self, *args: Any, **kwargs: Any) -> T:
        w = self._wrapper
        return await w._refresh_typed(w._request((self._instance, *args), kwargs, True))  # noqa: SLF001

    async def invalidate(self, *args: Any, **kwargs: Any) -> None:
        w = self._wrapper
        await w._invalidate((self._instance, *args), kwargs, True)  # noqa: SLF001


class CachedItemFunction(_Wrapper[P, T]):
    """What ``@cached_item`` returns: call it like the function it wraps.

    Also ``await f.invalidate(*args)``, ``await f.refresh(*args)`` and
    ``await f.peek(*args)``, all taking the function's own arguments.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        cache: Cache,
        table: str,
        key: Callable[..., Mapping[str, Any]],
        policy: Policy,
        name: str | None,
        consistent_reads: bool = False,
        version_attribute: str | None = None,
        localns: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fn, cache, name, table, localns)
        if self._plan is not None:
            _check_item_plan(self._plan, self.name, self._binder.has_attributes)
        self.consistent_reads = consistent_reads
        if version_attribute is not None and (
            not isinstance(version_attribute, str) or not version_attribute
        ):
            raise ConfigError("version_attribute must be a non-empty attribute name")
        self.version_attribute = version_attribute
        if not table or not isinstance(table, str):
            raise ConfigError("table must be a non-empty string")
        if not callable(key):
            raise ConfigError("key must be a callable returning the item's primary key")
        self.table = table
        self._key = key
        self.policy = policy
        self._memo: dict[str, tuple[str, str]] = {}
        # Whole-item calls of one text argument are first asked of the near
        # cache (no request built): not for typed values (rebuilt per call).
        self._near = (
            self.engine.near is not None and self._plan is None and self._binder.single_str_fast
        )
        if not consistent_reads and _reads_consistently(fn):
            warnings.warn(
                f"{self.name} reads with ConsistentRead=True but was decorated without "
                "consistent_reads=True: for fence_ttl after each invalidation its loads "
                "will be served but not stored. Pass consistent_reads=True.",
                UserWarning,
                stacklevel=3,
            )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        if self._near and not kwargs and len(args) == 1 and type(args[0]) is str:
            memo = self._memo.get(args[0])
            if memo is not None and (self._span_attributes is None or not _otel.recording()):
                engine = self.engine
                value = engine.near_item(memo[1], self.metrics, self.policy, self._request, args)
                if value is not NOT_HELD:
                    return _ready(value)
        # (The base class's steps, inlined: no extra frame on the Redis hit path.)
        req = self._request(args, kwargs, False)
        if self._direct:
            return self.engine.get(req)
        return self._call(req)

    def _identity(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], skip_first: bool
    ) -> tuple[str, Mapping[str, Any], Any]:
        pos, kw, attributes = self._binder.bind(args, kwargs, skip_first)
        key = self._key(*pos, **kw)
        if not isinstance(key, Mapping):
            raise ConfigError(
                f"the key= function of {self.name} ({_describe(self._key)}) returned "
                f"{type(key).__name__} {key!r:.60}; key= must return the item's primary "
                f"key as a mapping of key attribute names to values, e.g. "
                f'key=lambda user_id: {{"pk": user_id}}'
            )
        return item_identity(self.table, key), key, attributes

    def _request(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], skip_first: bool
    ) -> EntryRequest:
        entry: str | None = None
        if (
            len(args) == 1
            and type(args[0]) is str
            and not skip_first
            and (not kwargs or (len(kwargs) == 1 and _ATTRS in kwargs))
            and self._binder.single_str_fast
        ):
            # The common call, get(user_id): the key function is pure, so its
            # identity and entry key are remembered (bounded) per argument.
            memo = self._memo.get(args[0])
            identity, entry = self._entry_of(args[0]) if memo is None else memo
            attributes = kwargs.get(_ATTRS) if kwargs else None
        else:
            identity, _key, attributes = self._identity(args, kwargs, skip_first)
        fn = self.__wrapped__
        if self._binder.has_attributes:

            async def load(attrs: tuple[str, ...] | None) -> Any:
                call_kwargs = dict(kwargs)
                call_kwargs[_ATTRS] = None if attrs is None else list(attrs)
                return await fn(*args, **call_kwargs)

        elif self._plan is not None:
            plan = self._plan

            async def load(attrs: tuple[str, ...] | None) -> Any:
                return plan.dump(await fn(*args, **kwargs))

        else:

            async def load(attrs: tuple[str, ...] | None) -> Any:
                return await fn(*args, **kwargs)

        return self.engine.request(
            metrics=self.metrics,
            policy=self.policy,
            identity=identity,
            is_item=True,
            attrs=None if attributes is None else normalize_attributes(attributes),
            loader=load if self._span_attributes is None else self._traced_loader(load),
            entry=entry,
            consistent=self.consistent_reads,
            version_attr=self.version_attribute,
        )

    async def many(
        self,
        keys: Iterable[K],
        *,
        load: Callable[[list[K]], Awaitable[Mapping[K, T | None]]],
    ) -> dict[K, T | None]:
        """Many items at once: one pipelined read, then one ``load`` call for the misses.

        Each key is the accessor's one argument (``get_user.many(ids)`` reads
        what ``get_user(id)`` would for each id). Cached items are served as
        single calls would serve them (stale ones too, refreshed in the
        background by the accessor itself). The misses are leased in one
        pipeline; ``load`` is called once with the keys whose leases this
        call took and returns the items found by key (a key left out, or
        mapped to ``None``, has no item: a negative entry is stored). Keys
        another process is loading wait for its fill, as single calls do.
        Returns every key's item (``None`` where there is none), in the
        order of ``keys``; repeated keys are read once.

        Raises:
            ConfigError: the accessor takes more than one key argument.
        """
        if len(self._binder.names) != 1:
            raise ConfigError(
                f"{self.name}.many() needs an accessor of one key argument (besides attributes)"
            )
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        # One entry per identity (two keys may name one item).
        firsts: dict[str, K] = {}
        entries: list[str] = []
        identity_of: dict[K, str] = {}
        identities: list[str] = []
        memo: Mapping[Any, tuple[str, str]] = self._memo
        for k in wanted:
            known = memo.get(k) if type(k) is str else None
            identity, entry = self._entry_of(k) if known is None else known
            identity_of[k] = identity
            if identity not in firsts:
                firsts[identity] = k
                identities.append(identity)
                entries.append(entry)
        plan = self._plan

        def request(i: int) -> EntryRequest:
            return self._request((firsts[identities[i]],), {}, False)

        async def load_many(
            loading: Sequence[EntryRequest], _attrs: tuple[str, ...] | None
        ) -> Mapping[str, Any]:
            asked = [firsts[r.identity] for r in loading]
            found = await load(asked)
            out: dict[str, Any] = {}
            for r, k in zip(loading, asked, strict=True):
                value = found.get(k)
                if value is not None and plan is not None:
                    value = plan.dump(value)
                out[r.identity] = value
            return out

        got, _loaded = await self.engine.get_items(
            entries, request, load_many, self.metrics, self.policy
        )
        values: dict[str, T | None] = {}
        for i, (identity, value) in enumerate(zip(identities, got, strict=True)):
            if value is None or plan is None:
                values[identity] = value
                continue
            try:
                values[identity] = self._rebuild(value)
            except CodecError:
                # Stored by an older version of the type: a counted miss, reloaded alone.
                self.metrics.counts["decode_errors"] += 1
                fresh = await self.engine.refresh_now(request(i))
                values[identity] = self._rebuild(fresh, fresh=True)
        return {k: values[identity_of[k]] for k in wanted}

    def _entry_of(self, key: Any) -> tuple[str, str]:
        """The identity and entry key of a one-argument call (remembered for text keys)."""
        if type(key) is str:
            memo = self._memo.get(key)
            if memo is not None:
                return memo
        identity = self._identity((key,), {}, False)[0]
        memo = (identity, self.engine.keys.entry(identity))
        if type(key) is str:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = memo
        return memo

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Invalidate the item these arguments name (entry, lease and its item tag)."""
        await self._invalidate(args, kwargs, False)

    async def _invalidate(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], skip_first: bool
    ) -> None:
        _identity, key, _attrs = self._identity(args, kwargs, skip_first)
        await self.cache.invalidate_item(self.table, key)
        self.metrics.counts["invalidations"] += 1


class CachedFunction(_Wrapper[P, T]):
    """What ``@cached`` returns: call it like the function it wraps."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        cache: Cache,
        key: str | Callable[..., str] | None,
        tags: Sequence[str] | Callable[..., Iterable[str]] | None,
        policy: Policy,
        name: str | None,
        localns: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fn, cache, name, None, localns)
        self.policy = policy
        self._template: KeyTemplate | None = None
        self._key_fn: Callable[..., str] | None = None
        if isinstance(key, str):
            self._template = KeyTemplate(key)
            missing = set(self._template.fields) - set(self._binder.names)
            if missing:
                raise ConfigError(
                    f"key template {key!r} names unknown parameters {sorted(missing)}"
                )
        elif key is not None:
            if not callable(key):
                raise ConfigError("key must be a template string or a callable returning a string")
            self._key_fn = key
        self._tags = tags

    def _parts(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], skip_first: bool
    ) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        pos, kw, _ = self._binder.bind(args, kwargs, skip_first)
        if self._key_fn is not None:
            rendered = self._key_fn(*pos, **kw)
            if not isinstance(rendered, str):
                raise ConfigError(f"the key function of {self.name} must return a str")
            return result_identity(self.name, escape(rendered)), pos, kw
        arguments = self._binder.arguments(pos, kw, skip_first)
        if self._template is not None:
            return result_identity("", self._template.render(arguments)), pos, kw
        return result_identity(self.name, encode_args(arguments)), pos, kw

    def _request(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], skip_first: bool
    ) -> EntryRequest:
        identity, pos, kw = self._parts(args, kwargs, skip_first)
        fn = self.__wrapped__
        plan = self._plan
        if plan is None:

            async def load(_attrs: tuple[str, ...] | None) -> Any:
                return await fn(*args, **kwargs)

        else:

            async def load(_attrs: tuple[str, ...] | None) -> Any:
                return plan.dump(await fn(*args, **kwargs))

        tags_spec = self._tags
        tags: Callable[[], Sequence[str]] | None = None
        if tags_spec is not None:
            if callable(tags_spec):
                spec = tags_spec

                def tags() -> Sequence[str]:
                    return list(spec(*pos, **kw))

            else:
                fixed = list(tags_spec)

                def tags() -> Sequence[str]:
                    return fixed

        return self.engine.request(
            metrics=self.metrics,
            policy=self.policy,
            identity=identity,
            is_item=False,
            attrs=None,
            loader=self._traced_loader(load),
            tags=tags,
        )

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the result these arguments name."""
        await self._invalidate(args, kwargs, False)

    async def _invalidate(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], skip_first: bool
    ) -> None:
        identity, _, _ = self._parts(args, kwargs, skip_first)
        await self.cache.invalidate_identities([identity])
        self.metrics.counts["invalidations"] += 1


def cached_item(
    cache: Cache,
    *,
    table: str,
    key: Callable[..., Mapping[str, Any]],
    soft_ttl: float | None = None,
    hard_ttl: float | None = None,
    negative_ttl: float | None = None,
    jitter: float | None = None,
    early_refresh: float | None = None,
    name: str | None = None,
    consistent_reads: bool = False,
    version_attribute: str | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], CachedItemFunction[P, T]]:
    """Cache a DynamoDB item accessor as one Redis hash per item.

    The wrapped ``async def`` returns the item as plain Python values (or
    ``None`` when there is no item). If it takes an ``attributes`` parameter,
    callers may ask for just some attributes: they are read in one round trip and
    only the missing ones are loaded (the function is called with
    ``attributes=[...]``).

    Args:
        cache: the engine.
        table: the DynamoDB table name; with ``key`` it names the entry that
            every reader of the table and the stream hook share.
        key: called with the function's arguments (without ``attributes`` or
            ``self``); returns the item's primary key, e.g. ``{"pk": user_id}``.
        soft_ttl, hard_ttl, negative_ttl, jitter, early_refresh: override the
            cache's ``Policy`` for fills made through this function.
        name: metrics name (default ``module.qualname``).
        consistent_reads: say ``True`` when the function reads with
            ``ConsistentRead=True``. Its fills then skip the fence that follows
            an invalidation (which exists for eventually consistent reads that
            may still return the item as it was before the write). Leaving it
            off for a strongly consistent accessor loses its fills for
            ``fence_ttl`` after each write; a literal ``ConsistentRead=True``
            in the function's source makes decoration warn about that.
        version_attribute: the item's own version attribute (one every write
            changes, e.g. a number it increments). Projection loads then always
            include it, and missing attributes are merged into a fresh entry
            only if the entry holds the same version as the load read; else
            the entry is dropped and the caller gets one consistent load
            (``merges_outdated``). Without it, a projection missing some
            attributes loads the cached ones again with them and replaces the
            entry, so an answer never joins two versions of the item.

    Raises:
        ConfigError: invalid TTLs or arguments; at call time, a ``key`` that
            returns something other than a mapping.
    """
    policy = _policy(
        cache,
        soft_ttl=soft_ttl,
        hard_ttl=hard_ttl,
        negative_ttl=negative_ttl,
        jitter=jitter,
        early_refresh=early_refresh,
    )

    def decorate(fn: Callable[P, Awaitable[T]]) -> CachedItemFunction[P, T]:
        return CachedItemFunction(
            fn,
            cache,
            table,
            key,
            policy,
            name,
            consistent_reads,
            version_attribute,
            _caller_locals(),
        )

    return decorate


def cached(
    cache: Cache,
    *,
    key: str | Callable[..., str] | None = None,
    tags: Sequence[str] | Callable[..., Iterable[str]] | None = None,
    soft_ttl: float | None = None,
    hard_ttl: float | None = None,
    jitter: float | None = None,
    early_refresh: float | None = None,
    name: str | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], CachedFunction[P, T]]:
    """Cache any async function's result with soft/hard TTLs, leases and tags.

    Args:
        cache: the engine.
        key: a template such as ``"orders:{customer_id}"`` (fields are the
            function's parameters, escaped so keys stay injective), a callable
            returning a string, or ``None`` for a key built from all arguments.
        tags: strings (or a callable of the arguments returning them) that
            ``cache.purge_tags`` and stream invalidation use to drop this
            result, e.g. ``[item_tag("Orders", {"customer_id": c})]``.
        soft_ttl, hard_ttl, jitter, early_refresh: override the cache's policy.
        name: metrics name (default ``module.qualname``).
    """
    policy = _policy(
        cache, soft_ttl=soft_ttl, hard_ttl=hard_ttl, jitter=jitter, early_refresh=early_refresh
    )

    def decorate(fn: Callable[P, Awaitable[T]]) -> CachedFunction[P, T]:
        return CachedFunction(fn, cache, key, tags, policy, name, _caller_locals())

    return decorate
