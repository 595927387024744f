"""Recipe parameter values, typed when the recipe loads: a scalar, a gradient over the layers, or a
list of {filter, value} entries (the first entry whose filter is a substring of the tensor name wins).
`resolve` is the one resolver that `validate`, the planner and the card use; `FieldCheck` checks one
value against a method's parameter field (type, range, finiteness) and names the recipe field."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, PlainSerializer, TypeAdapter, ValidationError

FLOAT32_MAX = 3.4028234663852886e38  # a parameter beyond this turns float32 math into inf


class ParamValue:
    """A parsed recipe value. `at(name, t)` gives the concrete value for one tensor (None when no
    filter entry matches); `points()` every concrete value it can produce; `raw` the YAML form."""

    def at(self, tensor_name: str, t: float | None) -> Any:
        raise NotImplementedError

    def points(self) -> Iterator[Any]:
        raise NotImplementedError

    @property
    def raw(self) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Scalar(ParamValue):
    value: Any

    def at(self, tensor_name: str, t: float | None) -> Any:
        return self.value

    def points(self) -> Iterator[Any]:
        yield self.value

    @property
    def raw(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Gradient(ParamValue):
    """Piecewise-linear over an output slice's layers: t = i/(n-1) for layer i; t None (tensors
    outside the layers) takes the first value."""

    values: tuple[float, ...]

    def at(self, tensor_name: str, t: float | None) -> Any:
        v = self.values
        if len(v) == 1 or t is None:
            return v[0]
        x = min(max(t, 0.0), 1.0) * (len(v) - 1)
        i = min(int(x), len(v) - 2)
        return v[i] + (v[i + 1] - v[i]) * (x - i)

    def points(self) -> Iterator[Any]:
        yield from self.values

    @property
    def raw(self) -> Any:
        return list(self.values)


@dataclass(frozen=True)
class Filtered(ParamValue):
    entries: tuple[tuple[str | None, ParamValue], ...]

    def at(self, tensor_name: str, t: float | None) -> Any:
        for flt, value in self.entries:
            if flt is None or flt in tensor_name:
                return value.at(tensor_name, t)
        return None

    def points(self) -> Iterator[Any]:
        for _, value in self.entries:
            yield from value.points()

    @property
    def raw(self) -> Any:
        return [{"value": v.raw} if f is None else {"filter": f, "value": v.raw} for f, v in self.entries]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{v} is not a finite number; give a real value")
    if _number(v) and abs(v) > FLOAT32_MAX:
        raise ValueError(f"{v:g} is too large (beyond float32's range); give a smaller value")
    return v


def parse_value(raw: Any) -> ParamValue:
    """YAML value -> ParamValue; ValueError says what a value may be."""
    if isinstance(raw, ParamValue):
        return raw
    if isinstance(raw, dict):
        raise ValueError("a mapping is not a value; use a list of {filter, value} entries")
    if not isinstance(raw, list):
        if raw is not None and not isinstance(raw, (bool, int, float, str)):
            raise ValueError(f"{type(raw).__name__} is not a value; give a number, a boolean or a string")
        return Scalar(_finite(raw))
    if not raw:
        raise ValueError("an empty list is not a value; give a scalar, a gradient list or filter entries")
    if all(isinstance(v, dict) for v in raw):
        entries = []
        for k, entry in enumerate(raw):
            if set(entry) - {"filter", "value"} or "value" not in entry:
                raise ValueError(f"entry {k}: a filter entry has keys `filter` (optional) and `value`")
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ValueError(f"entry {k}: `filter` must be a string (a substring of tensor names)")
            value = entry["value"]
            if isinstance(value, list) and not (value and all(_number(x) for x in value)):
                raise ValueError(f"entry {k}: `value` must be a scalar or a list of numbers")
            if isinstance(value, dict):
                raise ValueError(f"entry {k}: `value` must be a scalar or a list of numbers")
            try:
                entries.append((flt, parse_value(value)))
            except ValueError as e:
                raise ValueError(f"entry {k}: {e}") from None
        return Filtered(tuple(entries))
    if all(_number(v) for v in raw):
        return Gradient(tuple(_finite(float(v)) for v in raw))
    raise ValueError("a list value must be all numbers (a gradient) or all {filter, value} entries")


def _none_is_empty(raw: Any) -> Any:
    return {} if raw is None else raw


# The recipe models' `parameters` type: each value is parsed under its own key, so an error reads
# `models[1].parameters.weight: ...`; `parameters: null` (every line commented out) is empty.
ParamMap = Annotated[dict[str, Annotated[Any, BeforeValidator(parse_value), PlainSerializer(lambda v: v.raw)]],
                     BeforeValidator(_none_is_empty)]


class FieldCheck:
    """One parameter field of a method's Params/ModelParams: the keys a recipe may use for it (name
    and alias), whether it is required, and a check of one concrete value."""

    def __init__(self, name: str, info: Any):
        self.name = name
        self.key = info.alias or name
        self.keys = {name, self.key}
        ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        self.adapter = TypeAdapter(ann)
        self.required = info.is_required()
        self.is_bool = info.annotation is bool

    def given(self, *levels: dict[str, ParamValue]) -> bool:
        return any(k in level for level in levels for k in self.keys)

    def check(self, value: Any) -> str | None:
        """None when `value` fits this field, else what is wrong with it."""
        if isinstance(value, bool) and not self.is_bool:
            return f"expects a number, not the boolean {str(value).lower()}"
        try:
            _finite(value)
            self.adapter.validate_python(value)
        except ValueError as e:
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            return msg.removeprefix("Value error, ")
        return None


def fields_of(model: type[BaseModel]) -> dict[str, FieldCheck]:
    """Every accepted key (field name and alias) -> its FieldCheck."""
    out: dict[str, FieldCheck] = {}
    for name, info in model.model_fields.items():
        f = FieldCheck(name, info)
        out.update({k: f for k in f.keys})
    return out


@dataclass(frozen=True)
class Level:
    """One parameter scope in precedence order: its YAML location and its parameters."""

    where: str                         # e.g. "models[1].parameters", "slices[0].parameters", "parameters"
    params: dict[str, ParamValue]


def resolve(levels: list[Level], model: type[BaseModel], tensor_name: str,
            t: float | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields of `model` for one tensor, highest-precedence level first: (values by key, the YAML
    location each value came from). A level whose filters all miss the tensor gives way to the next."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for fname, info in model.model_fields.items():
        keys = [k for k in (info.alias, fname) if k]
        for level in levels:
            key = next((k for k in keys if k in level.params), None)
            if key is None:
                continue
            value = level.params[key].at(tensor_name, t)
            if value is not None:
                values[info.alias or fname] = value
                origin[info.alias or fname] = f"{level.where}.{key}"
                break
    return values, origin
