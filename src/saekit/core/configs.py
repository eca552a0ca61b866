"""Configs as documented dataclasses: built from plain data with every field type-checked, and
written back as plain data. Errors name the field by its dotted path (``saes.0.sae.activation.k``).

A :class:`KindConfig` family is a choice among dataclasses by a ``kind`` key: an activation
(``{kind: topk, k: 32}``), a penalty (``{kind: log, eps: 0.1}``), a revival signal. Each kind
has only the fields that mean something for it, so a field that would be ignored is refused.
A bare string is the kind with its defaults (``penalty: l1``).

Imports nothing from saekit, so every layer can describe its own config.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar


class KindConfig:
    """Base of a config family chosen by ``kind``. Subclass once per family (the family base
    sets ``family``), then once per kind (a dataclass that sets ``kind``)."""

    family: ClassVar[str] = ""
    """What the family is called in messages (e.g. "activation")."""
    kind: ClassVar[str] = ""
    kind_key: ClassVar[str] = "kind"
    """The key naming the kind in plain data (a data source's is ``source``)."""
    _kinds: ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:  # a family base: its own registry
            cls._kinds = {}
        elif "kind" in cls.__dict__:
            cls._kinds[cls.kind] = cls

    @classmethod
    def kinds(cls) -> list[str]:
        return sorted(cls._kinds)

    @classmethod
    def parse(cls, value: Any, where: str) -> KindConfig:
        """A config of this family from a kind name, a mapping with ``kind``, or an instance."""
        key = cls.kind_key
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {key: value}
        if not isinstance(value, dict) or key not in value:
            raise ValueError(
                f"{where}: expected a {cls.family} kind or a mapping with {key!r} (one of "
                f"{cls.kinds()}), got {value!r}"
            )
        data = dict(value)
        kind = data.pop(key)
        if not isinstance(kind, str) or kind not in cls._kinds:
            raise ValueError(
                f"{where}.{key}: unknown {cls.family} {kind!r}; choose one of {cls.kinds()}"
            )
        chosen = cls._kinds[kind]
        names = [f.name for f in dataclasses.fields(chosen)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"{where}: {unknown} do(es) not apply to {cls.family} {kind!r} (its fields: "
                f"{names or 'none'})"
            )
        return from_dict(chosen, data, where)


def check_finite(where: str, value: float, low: float | None = None, strict: bool = False) -> None:
    """Raise ValueError unless ``value`` is finite and above ``low`` (strictly if asked)."""
    if not math.isfinite(value) or (low is not None and (value <= low if strict else value < low)):
        bound = "" if low is None else f" {'>' if strict else '>='} {low}"
        raise ValueError(f"{where} must be a finite number{bound}, got {value!r}")


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (a KindConfig gains its ``kind``, under its ``kind_key``)."""
    if dataclasses.is_dataclass(obj):
        fields = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {obj.kind_key: obj.kind, **fields} if isinstance(obj, KindConfig) else fields
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # X | None: the one real cause, not "does not fit X | None"
            raise ValueError(errors[0])
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if isinstance(tp, type) and issubclass(tp, KindConfig):
        return tp.parse(value, where)
    if isinstance(tp, type) and hasattr(tp, "from_plain"):  # a family with its own parse
        return tp.from_plain(value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), where)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return _finite(float(value), where)
        except OverflowError:
            raise ValueError(f"{where}: expected a finite number, got {value!r}") from None
        except ValueError as exc:
            if str(exc).startswith(where):
                raise
            raise ValueError(f"{where}: expected float, got {value!r}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool, float):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported type {tp}")


def _finite(value: float, where: str) -> float:
    """No config float means anything as NaN or ±inf: refused for every field, by name."""
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every field's type; errors name it."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown field(s) {unknown}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, path)
    missing = [
        n
        for n, f in fields.items()
        if f.init and n not in kwargs
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:  # not "__init__() missing 1 required positional argument"
        raise ValueError(f"{where or cls.__name__}: missing required field(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{where or cls.__name__}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{where or cls.__name__}: {exc}") from exc
