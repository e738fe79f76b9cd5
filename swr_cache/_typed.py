"""Typed values: store dataclasses, Pydantic v2 models and msgspec Structs as their fields.

A decorated function's return annotation says what it returns. When that
names such a type (alone, in ``list[...]``, ``tuple[..., ...]``,
``dict[str, ...]`` or ``X | None``), a value is stored as msgpack of its
fields (plain data, like every other value) and rebuilt as the annotated type
on the way out, on hits and misses alike, so every caller gets the same kind
of object. Never pickle: rebuilding runs the type's own constructor or
validator on plain data, never code named by the cache.

Pydantic and msgspec are never imported here: a model class in an annotation
means its library is already in ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Union

from ._errors import CodecError, ConfigError

__all__ = ["ValuePlan", "plan_for_return"]

_NONE_TYPE: Final = type(None)


class ValuePlan:
    """How to turn one annotated type into plain data and back."""

    __slots__ = ()

    def dump(self, value: Any) -> Any:
        raise NotImplementedError

    def load(self, data: Any) -> Any:
        raise NotImplementedError


class _Optional(ValuePlan):
    __slots__ = ("inner",)

    def __init__(self, inner: ValuePlan) -> None:
        self.inner = inner

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)

    def load(self, data: Any) -> Any:
        return None if data is None else self.inner.load(data)


class _List(ValuePlan):
    __slots__ = ("inner", "make")

    def __init__(self, inner: ValuePlan, make: Callable[[Any], Any]) -> None:
        self.inner = inner
        self.make = make

    def dump(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [self.inner.dump(v) for v in value]
        return value

    def load(self, data: Any) -> Any:
        if not isinstance(data, list):
            raise CodecError(f"expected a list, found {type(data).__name__}")
        return self.make(self.inner.load(v) for v in data)


class _Dict(ValuePlan):
    __slots__ = ("inner",)

    def __init__(self, inner: ValuePlan) -> None:
        self.inner = inner

    def dump(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: self.inner.dump(v) for k, v in value.items()}
        return value

    def load(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise CodecError(f"expected a map, found {type(data).__name__}")
        return {k: self.inner.load(v) for k, v in data.items()}


class _Enum(ValuePlan):
    __slots__ = ("cls",)

    def __init__(self, cls: type[enum.Enum]) -> None:
        self.cls = cls

    def dump(self, value: Any) -> Any:
        return value.value if isinstance(value, enum.Enum) else value

    def load(self, data: Any) -> Any:
        return self.cls(data)


class _Dataclass(ValuePlan):
    """Fields passed to ``__init__`` (others are derived, e.g. in ``__post_init__``)."""

    __slots__ = ("cls", "fields")

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        self.fields: dict[str, ValuePlan | None] = {}  # filled in by _Planner (recursion)

    def dump(self, value: Any) -> Any:
        if not isinstance(value, self.cls):
            return value
        out: dict[str, Any] = {}
        for name, plan in self.fields.items():
            v = getattr(value, name)
            out[name] = v if plan is None else plan.dump(v)
        return out

    def load(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise CodecError(f"expected the fields of {self.cls.__qualname__}, found {data!r:.60}")
        kwargs: dict[str, Any] = {}
        for name, v in data.items():
            if name not in self.fields:
                continue  # a field removed since the entry was written
            plan = self.fields[name]
            kwargs[name] = v if plan is None else plan.load(v)
        try:
            return self.cls(**kwargs)
        except TypeError as exc:  # a field added since (no default): a miss
            raise CodecError(f"cannot rebuild {self.cls.__qualname__}: {exc}") from exc


class _Pydantic(ValuePlan):
    __slots__ = ("cls",)

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls

    def dump(self, value: Any) -> Any:
        if not isinstance(value, self.cls):
            return value
        # Python mode keeps Decimal, datetime, UUID and bytes exact (the codec
        # has types for them); plain Enums are the one thing left to flatten.
        return _flatten_enums(value.model_dump(mode="python"))

    def load(self, data: Any) -> Any:
        try:
            return self.cls.model_validate(data)
        except ValueError as exc:  # pydantic.ValidationError: an outdated shape
            raise CodecError(f"cannot rebuild {self.cls.__qualname__}: {exc}") from exc


class _Msgspec(ValuePlan):
    __slots__ = ("cls", "msgspec")

    def __init__(self, cls: type[Any], module: Any) -> None:
        self.cls = cls
        self.msgspec = module

    def dump(self, value: Any) -> Any:
        if not isinstance(value, self.cls):
            return value
        return self.msgspec.to_builtins(value, builtin_types=_MSGSPEC_BUILTINS)

    def load(self, data: Any) -> Any:
        try:
            return self.msgspec.convert(data, self.cls, builtin_types=_MSGSPEC_BUILTINS)
        except self.msgspec.ValidationError as exc:
            raise CodecError(f"cannot rebuild {self.cls.__qualname__}: {exc}") from exc


def _msgspec_builtins() -> tuple[type[Any], ...]:
    import datetime
    import decimal
    import uuid

    # Types our codec stores exactly, so msgspec need not turn them into strings.
    return (bytes, datetime.datetime, datetime.date, decimal.Decimal, uuid.UUID)


_MSGSPEC_BUILTINS: Final = _msgspec_builtins()


def _flatten_enums(value: Any) -> Any:
    if isinstance(value, enum.Enum) and not isinstance(value, (str, int)):
        return _flatten_enums(value.value)
    if isinstance(value, dict):
        return {k: _flatten_enums(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flatten_enums(v) for v in value]
    return value


def _model_kind(tp: Any) -> str | None:
    if not isinstance(tp, type):
        return None
    if dataclasses.is_dataclass(tp):
        return "dataclass"
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and issubclass(tp, pydantic.BaseModel):
        return "pydantic"
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and issubclass(tp, msgspec.Struct):
        return "msgspec"
    if issubclass(tp, enum.Enum) and not issubclass(tp, (str, int)):
        return "enum"
    return None


class _Planner:
    """Builds plans, once per type (dataclasses may refer to themselves)."""

    def __init__(self, localns: Mapping[str, Any] | None) -> None:
        self.localns = dict(localns or {})
        self.made: dict[type[Any], ValuePlan] = {}

    def plan(self, tp: Any) -> ValuePlan | None:
        """A plan for ``tp``, or ``None`` when values of it need no conversion."""
        origin = typing.get_origin(tp)
        if origin is Union or origin is types.UnionType:
            return self._union(tp)
        if origin in (list, tuple) or tp in (list, tuple):
            return self._sequence(tp, origin)
        if origin is dict:
            args = typing.get_args(tp)
            inner = self.plan(args[1]) if len(args) == 2 else None
            return None if inner is None else _Dict(inner)
        kind = _model_kind(tp)
        if kind is None:
            return None
        made = self.made.get(tp)
        if made is not None:
            return made
        if kind == "enum":
            made = _Enum(tp)
        elif kind == "pydantic":
            made = _Pydantic(tp)
        elif kind == "msgspec":
            made = _Msgspec(tp, sys.modules["msgspec"])
        else:
            return self._dataclass(tp)
        self.made[tp] = made
        return made

    def _union(self, tp: Any) -> ValuePlan | None:
        """``X | None`` rebuilds as X (or passes None); a union of two models is refused."""
        args = typing.get_args(tp)
        rest = [a for a in args if a is not _NONE_TYPE]
        plans = [self.plan(a) for a in rest]
        if not any(plans):
            return None
        if len(rest) != 1:
            names = " | ".join(getattr(a, "__qualname__", repr(a)) for a in rest)
            raise ConfigError(
                f"cannot tell which of {names} to rebuild a cached value as: "
                "return one model type (or X | None)"
            )
        inner = plans[0]
        assert inner is not None
        return _Optional(inner) if len(rest) < len(args) else inner

    def _sequence(self, tp: Any, origin: Any) -> ValuePlan | None:
        """``list[X]`` and ``tuple[X, ...]`` of models (fixed-length tuples are left alone)."""
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return None
        inner = self.plan(args[0]) if args else None
        if inner is None:
            return None
        return _List(inner, list if origin is list else tuple)

    def _dataclass(self, tp: Any) -> ValuePlan:
        dc = _Dataclass(tp)
        self.made[tp] = dc  # before its fields: a field may name tp again
        try:
            hints = typing.get_type_hints(tp, localns=self.localns)
        except Exception:  # an unresolvable field annotation: that field as is
            hints = {}
        for field in dataclasses.fields(tp):
            if field.init:
                dc.fields[field.name] = self.plan(hints.get(field.name, Any))
        return dc


def plan_for_return(
    fn: Callable[..., Any], localns: Mapping[str, Any] | None = None
) -> ValuePlan | None:
    """The plan for ``fn``'s return annotation, or ``None`` (store values as they are).

    Args:
        fn: the decorated function.
        localns: names visible where it was decorated (for annotations naming
            classes local to a function, under ``from __future__ import annotations``).

    Raises:
        ConfigError: a union of two model types (which to rebuild is unknown).
    """
    annotation = getattr(fn, "__annotations__", {}).get("return")
    if annotation is None:
        return None
    try:
        hints = typing.get_type_hints(fn, localns=dict(localns or {}))
    except Exception:  # an unresolvable forward reference: store values as they are
        return None
    return _Planner(localns).plan(hints.get("return"))
