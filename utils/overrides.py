"""Typed settings: a value (command-line text or plain data) converted to its field's declared type.

A ``--set KEY=VALUE`` on the command line, a ``$MEDISCOPE_SET`` JSON value and a keyword argument
in Python all go through :func:`convert`, so a config field receives the type its annotation
declares, within its :class:`Limit`, or the value is refused with one line saying what the field
accepts::

    convert("64,64,32", tuple[int, int, int], Limit(16, multiple=16))  # -> (64, 64, 32)
    convert("abc", int, Limit(1))         # ValueError: expected a positive integer
    convert("maybe", Optional[bool])      # ValueError: expected one of true, false, auto

Annotations understood: ``int``, ``float`` (finite), ``bool`` (``true`` / ``false``, any case),
``str``, ``Literal[...]`` (one of the listed strings), ``tuple[X, X, X]`` and ``tuple[X, ...]``
(comma-separated text, optionally in brackets, or a list), ``Optional[X]`` (``none`` or ``auto``
is None) and ``dict`` (a mapping, or a Python literal of one). A bool is never taken for a number
and a float never for an integer (``1.5`` and ``2.0`` are refused where an ``int`` is declared).
"""
from __future__ import annotations

import ast
import math
import numbers
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

NONE_WORDS = ("none", "auto")  # text for None in an Optional field


@dataclass(frozen=True)
class Limit:
    """The accepted values of a number (of each element, for a tuple).

    Args:
        low / high: bounds (None: unbounded); included unless ``low_open`` / ``high_open``.
        multiple: the number must be a multiple of this.
        also: values accepted outside the range (e.g. 0 for "0 or >= 2").
        none: what None means, for the message of an Optional field (``'auto'``, ``'none'``).
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    multiple: Optional[int] = None
    also: tuple = ()
    none: str = "auto"

    def accepts(self, x: float) -> bool:
        if x in self.also:
            return True
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            return False
        return self.multiple is None or x % self.multiple == 0

    def describe(self, noun: str) -> str:
        """``'a positive integer'``, ``'a number in [0, 1)'``, ``'0 or an integer >= 2'``, ..."""
        low, high = (None if v is None else _number(v) for v in (self.low, self.high))
        article = "an" if noun[0] in "aeiou" else "a"
        positive = self.low == 0 and self.low_open or (noun == "integer" and self.low == 1 and not self.low_open)
        if self.multiple is not None:
            text = f"a positive multiple of {self.multiple}" if self.low == self.multiple else \
                f"a multiple of {self.multiple}" + ("" if low is None else f" >= {low}")
        elif low is not None and high is not None:
            text = f"{article} {noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif positive and high is None:
            text = f"a positive {noun}"
        elif low is not None:
            text = f"{article} {noun} {'>' if self.low_open else '>='} {low}"
        elif high is not None:
            text = f"{article} {noun} {'<' if self.high_open else '<='} {high}"
        else:
            text = f"{article} {noun}"
        return f"{' or '.join(map(_number, self.also))} or {text}" if self.also else text


def _number(x: float) -> str:
    """``4294967295``, ``0.5``, ``1e-05``: integers in full, other numbers as ``%g``."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of the dataclass ``cls``."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _optional_inner(kind) -> Any:
    """X of ``Optional[X]``, else None."""
    if get_origin(kind) is Union:
        inner = [a for a in get_args(kind) if a is not type(None)]
        if len(inner) == 1 and len(get_args(kind)) == 2:
            return inner[0]
    return None


def describe(kind, limit: Optional[Limit] = None) -> str:
    """What a field of annotation ``kind`` accepts, as a phrase after "expected"."""
    inner = _optional_inner(kind)
    if inner is not None:
        none = (limit or Limit()).none
        if inner is bool or get_origin(inner) is Literal:
            return f"{describe(inner, limit)}, {none}"
        return f"{describe(inner, limit)}, or {none}"
    if kind is bool:
        return "one of true, false"
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    if kind is int or kind is float:
        return (limit or Limit()).describe("integer" if kind is int else "number")
    if kind is str:
        return "a string"
    if get_origin(kind) is tuple:
        args = get_args(kind)
        count = "" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} "
        return f"{count}comma-separated values, each {describe(args[0], limit)}"
    if kind is dict or get_origin(kind) is dict:
        return "a mapping, e.g. {'denoiser': {'head_kernel': 3}}"
    raise TypeError(f"no conversion for the annotation {kind!r}")


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def _items(value) -> list:
    """The elements of a tuple value: a list / tuple, or comma-separated text in optional brackets."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        raise ValueError
    text = value.strip()
    if text[:1] + text[-1:] in ("()", "[]"):
        text = text[1:-1].strip()
    items = [part.strip() for part in text.split(",")] if text else []
    return items[:-1] if items and items[-1] == "" else items  # "64,64,32," as written in Python


def _convert(value, kind, limit: Optional[Limit]):
    """``value`` as ``kind``; a bare ValueError (or SyntaxError) when it is not one."""
    inner = _optional_inner(kind)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        return _convert(value, inner, limit)
    text = _unquote(value) if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false"):
            return text.lower() == "true"
    elif get_origin(kind) is Literal:
        if (text if text is not None else value) in get_args(kind):
            return text if text is not None else value
    elif kind is int or kind is float:
        number = None
        if isinstance(value, bool):
            pass
        elif kind is int and isinstance(value, numbers.Integral):
            number = int(value)
        elif kind is int and text is not None and re.fullmatch(r"[+-]?\d+", text):
            number = int(text)
        elif kind is float and isinstance(value, numbers.Real):
            number = float(value)
        elif kind is float and text is not None:
            number = float(text)
        if number is not None and math.isfinite(number) and (limit is None or limit.accepts(number)):
            return number
    elif kind is str:
        if text is not None:
            return text
    elif get_origin(kind) is tuple:
        args, items = get_args(kind), _items(value)
        kinds = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) == len(items):
            return tuple(_convert(v, k, limit) for v, k in zip(items, kinds))
    elif kind is dict or get_origin(kind) is dict:
        parsed = ast.literal_eval(text) if text is not None else value
        if isinstance(parsed, dict):
            return parsed
    else:
        raise TypeError(f"no conversion for the annotation {kind!r}")
    raise ValueError


def convert(value, kind, limit: Optional[Limit] = None):
    """``value`` (text from a command line, or a plain value) as a value of annotation ``kind``.

    Raises:
        ValueError: one line, ``expected <what kind and limit accept>`` (callers prefix the key).
    """
    try:
        return _convert(value, kind, limit)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"expected {describe(kind, limit)}") from None


def convert_fields(config, limits: dict[str, Limit]) -> list[str]:
    """Convert every field of the dataclass instance ``config`` in place (frozen ones too) to its
    annotation, within ``limits[name]``; returns one problem per field refused
    (``"name=value: expected ..."``), leaving those fields as they were."""
    problems = []
    for name, kind in field_types(type(config)).items():
        value = getattr(config, name)
        try:
            object.__setattr__(config, name, convert(value, kind, limits.get(name)))
        except ValueError as exc:
            problems.append(f"{name}={value!r}: {exc}")
    return problems


def convert_sections(changes, sections: dict[str, dict[str, Any]]) -> tuple[dict, list[str]]:
    """``{'diffusion': {'num_samples': '4'}}`` -> (a copy with each field of ``sections[section]``
    converted to its annotation, the problems): an unknown section or a bad value is a problem; a
    field a section does not list is left for the config that builds the section to refuse."""
    unknown = sorted(set(changes) - set(sections))
    if unknown:
        return dict(changes), [f"model_overrides: unknown sections {unknown} (choose from {tuple(sections)})"]
    converted, problems = {}, []
    for section, values in changes.items():
        if not isinstance(values, dict):
            problems.append(f"{section}={values!r}: expected a mapping of its fields")
            continue
        converted[section] = dict(values)
        for name in set(values) & set(sections[section]):
            try:
                converted[section][name] = convert(values[name], sections[section][name])
            except ValueError as exc:
                problems.append(f"{section}.{name}={values[name]!r}: {exc}")
    return converted, problems


def setting_type(key: str, types: dict[str, Any], limits: dict[str, Limit],
                 sections: dict[str, dict[str, Any]]) -> tuple[Any, Optional[Limit]]:
    """The annotation and range of ``key``: a field in ``types`` (range ``limits[key]``) or
    ``SECTION.FIELD`` of ``sections`` (no range: the section's config checks it).

    Raises:
        ValueError: any other key (the message lists the keys there are).
    """
    section, dot, name = key.partition(".")
    if not dot:
        if key in types:
            return types[key], limits.get(key)
        raise ValueError(f"unknown key; choose one of {', '.join(types)} or SECTION.FIELD ({', '.join(sections)})")
    if section not in sections:
        raise ValueError(f"unknown section {section!r}; choose from {', '.join(sections)}")
    if name not in sections[section]:
        raise ValueError(f"{section} has no settable field {name!r}; choose from {', '.join(sections[section])}")
    return sections[section][name], None


def parse_settings(items: list[str], types: dict[str, Any], limits: dict[str, Limit],
                   sections: dict[str, dict[str, Any]], option: str = "--set") -> dict[str, Any]:
    """``['KEY=VALUE', ...]`` -> ``{KEY: value}``, each value converted by :func:`setting_type`.

    Raises:
        ValueError: one line naming the option, the key, the value and what the key accepts,
            e.g. ``--set batch_size='abc': expected a positive integer``.
    """
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = convert(raw, *setting_type(key, types, limits, sections))
        except ValueError as exc:
            raise ValueError(f"{option} {key}={raw.strip()!r}: {exc}") from None
    return out
