"""Settings a person writes (recipe YAML, a model's ``moe`` section), checked by pydantic against dataclasses.

A settings class is a plain dataclass marked :func:`section` (unknown keys are refused) whose fields use the strict
types below where YAML would otherwise be read loosely: pydantic's lax mode turns ``"4"`` into 4 and ``1`` into
``True``, which a recipe should refuse. :func:`validate` returns the object and every problem at once, each one
line ``key.path: reason`` (an unknown key ends with "did you mean ...?"), the form medtune's recipe errors have
always had; pydantic does the walking, this module only words its errors.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError, with_config

from medtune.errors import suggestion


def _number_from_text(value: Any) -> Any:
    """YAML reads ``2e-3`` (no dot) as a string; take it as the number a person meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Number = Annotated[float, BeforeValidator(_number_from_text), Strict()]   # an int is a number too
Mapping = Annotated[dict, Strict()]


_STRICT = {int: Int, bool: Bool, str: Str, float: Number, dict: Mapping}


def strict(hint: Any) -> Any:
    """``hint`` with its scalar types made strict (``int`` -> :data:`Int` ...), through unions and lists: for a
    plain dataclass that must not import pydantic (a model's settings, which its exported code carries)."""
    if hint in _STRICT:
        return _STRICT[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(strict(arg) for arg in args)]
    if origin is list:
        return list[strict(args[0])]
    return hint


def section(cls: type) -> type:
    """Mark a dataclass as a settings section: validated by pydantic, unknown keys refused."""
    return with_config(ConfigDict(extra="forbid"))(cls)


class Invalid:
    """What a section with problems validates to: its problems are recorded, its rules are not checked."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID = Invalid()


def validate(hint: Any, value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``(value as hint, [])``, or ``(INVALID, problems)`` naming each key path (``path`` is the value's own)."""
    try:
        return _adapter(hint).validate_python(value), []
    except ValidationError as error:
        problems = []
        for detail in error.errors(include_url=False):
            problem = _problem(hint, detail, path)
            if problem not in problems:   # a union's options each report the same value
                problems.append(problem)
        return INVALID, problems


def keys(cls: type) -> list[str]:
    """The keys a section takes (fields written elsewhere, such as ``model.attn_implementation``, are not its)."""
    return [f.name for f in dataclasses.fields(cls) if "written_as" not in f.metadata]


def unknown_keys(data: dict, known: list[str], path: str, *, list_known: bool = True) -> list[str]:
    """``path.key: unknown key (did you mean ...?)`` for each key of ``data`` not in ``known``."""
    problems = []
    for key in data:
        if key not in known:
            hint = suggestion(key, known, list_known=list_known)
            problems.append(f"{join(path, str(key))}: unknown key" + (f" ({hint})" if hint else ""))
    return problems


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint)


def _problem(hint: Any, detail: dict, path: str) -> str:
    """One pydantic error as ``path: reason``: its location is walked through the type hints, so that a union's
    options (which pydantic reports one by one, under their own labels) become one "expected A or B"."""
    loc, value, kind = list(detail["loc"]), detail["input"], detail["type"]
    while loc:
        hint = _bare(hint)
        options = _options(hint)
        if len(options) > 1:
            return f"{path}: expected {_names(options)}, got {describe(value)}"
        hint = _bare(options[0]) if options else hint
        key = loc.pop(0)
        if dataclasses.is_dataclass(hint) and key in {f.name for f in dataclasses.fields(hint)}:
            hint = typing.get_type_hints(hint, include_extras=True)[key]
        elif typing.get_origin(hint) is list and isinstance(key, int):
            hint = typing.get_args(hint)[0]
        elif kind in ("extra_forbidden", "unexpected_keyword_argument") and dataclasses.is_dataclass(hint):
            return unknown_keys({key: value}, keys(hint), path)[0]
        else:
            hint = Any
        path = join(path, key)
    options = _options(_bare(hint))
    hint = _bare(options[0] if len(options) == 1 else hint)
    if kind == "value_error":   # a section's own check (__post_init__): "field: reason" names the key
        message = str(detail["ctx"]["error"])
        name, _, reason = message.partition(": ")
        if reason and dataclasses.is_dataclass(hint) and name in {f.name for f in dataclasses.fields(hint)}:
            return f"{join(path, name)}: {reason}"
        return f"{path}: {message}"
    return f"{path or 'recipe'}: {_reason(hint, detail)}"


def _reason(hint: Any, detail: dict) -> str:
    kind, value = detail["type"], detail["input"]
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{value!r} is not one of {', '.join(map(str, typing.get_args(hint)))}"
    expected = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
                "string_type": "a string", "dict_type": "a mapping", "dataclass_type": "a mapping",
                "list_type": "a list"}.get(kind)
    if expected:
        return f"expected {expected}, got {describe(value)}"
    return detail["msg"]


def _bare(hint: Any) -> Any:
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _options(hint: Any) -> list:
    """A union's options other than None ([] for anything else)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [option for option in typing.get_args(hint) if option is not type(None)]
    return []


def _type_name(hint: Any) -> str:
    hint = _bare(hint)
    if dataclasses.is_dataclass(hint) or hint is dict:
        return "a mapping"
    if hint is bool:
        return "true, false"
    if typing.get_origin(hint) is Literal:
        return f"one of {', '.join(map(str, typing.get_args(hint)))}"
    if typing.get_origin(hint) is list:
        return "a list"
    return {str: "a string", int: "an integer", float: "a number"}.get(hint, getattr(hint, "__name__", str(hint)))


def _names(options: list) -> str:
    names = [_type_name(option) for option in options]
    return ", ".join(names[:-1]) + " or " + names[-1]
