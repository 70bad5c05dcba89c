"""The pass spec language and spec files, turned into configured Pass objects.

Spec grammar (whitespace is free between tokens)::

    spec    := item ("," item)*
    item    := NAME ("{" [option ("," option)*] "}")?
    option  := KEY "=" value
    value   := scalar | "[" [scalar ("," scalar)*] "]"
    scalar  := 'quoted' | "quoted" | bare token of letters, digits, "_", ".", "+", "-"

e.g. ``fuse-attention{layers=[0,2]}, route-attention{window=512}``. Values are converted by the type
of the config dataclass field they set (int, float, bool, str, Enum, tuple[int, ...], X | None).
The same pipeline can come from a JSON or YAML file: a list of ``{"name": ..., "options": {...}}``
or ``{pass-name: {options}}`` items, or one mapping ``{pass-name: {options}, ...}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condfx.passes.base import Pass
from condfx.passes.registry import get_pass_class

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_BARE = re.compile(r"[A-Za-z0-9_.+-]+")
_NONE_WORDS = ("none", "null")
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


@dataclass(frozen=True)
class PassSpec:
    """One pass asked for by a spec: its name and raw option values, before type conversion."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    column: int = 0  # 1-based column of the name in a text spec; 0 when it came from a file


class _Scanner:
    """A cursor over a text spec that raises ValueError pointing at the column."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, what: str, pos: int | None = None) -> ValueError:
        pos = self.pos if pos is None else pos
        found = repr(self.text[pos]) if pos < len(self.text) else "end of spec"
        msg = (
            f"Malformed pass spec at column {pos + 1}: expected {what}, found {found}.\n"
            f"  {self.text}\n  {' ' * pos}^"
        )
        return ValueError(msg)

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, char: str) -> bool:
        if self.peek() != char:
            return False
        self.pos += 1
        return True

    def expect(self, char: str, what: str) -> None:
        if not self.take(char):
            raise self.error(what)

    def token(self, pattern: re.Pattern, what: str) -> str:
        self.peek()
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise self.error(what)
        self.pos = m.end()
        return m.group()

    def scalar(self) -> str:
        quote = self.peek()
        if quote not in ("'", '"'):
            return self.token(_BARE, "a value (number, word, quoted string or [list])")
        end = self.text.find(quote, self.pos + 1)
        if end < 0:
            what = f"a closing {quote}"
            raise self.error(what, len(self.text))
        value, self.pos = self.text[self.pos + 1 : end], end + 1
        return value

    def value(self) -> str | list[str]:
        if not self.take("["):
            return self.scalar()
        items: list[str] = []
        if self.take("]"):
            return items
        items.append(self.scalar())
        while self.take(","):
            items.append(self.scalar())
        self.expect("]", "',' or ']'")
        return items


def _parse_options(sc: _Scanner) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if sc.take("}"):
        return options
    while True:
        key_pos = sc.pos
        key = sc.token(_NAME, "an option name")
        if key in options:
            what = f"a new option name (option '{key}' is given twice)"
            raise sc.error(what, key_pos)
        sc.expect("=", f"'=' after option '{key}'")
        options[key] = sc.value()
        if sc.take("}"):
            return options
        sc.expect(",", "',' or '}'")


def parse_spec(text: str) -> list[PassSpec]:
    """Parses a text spec such as ``"fuse-attention{layers=[0,1]}"`` into PassSpecs.

    Args:
        text: the spec (grammar in the module docstring).

    Returns:
        One PassSpec per pass, option values still raw strings or lists of strings.

    Raises:
        ValueError: the spec is malformed; the message shows the column.
    """
    sc = _Scanner(text)
    specs = []
    while True:
        sc.peek()
        column = sc.pos + 1
        name = sc.token(_NAME, "a pass name")
        options = _parse_options(sc) if sc.take("{") else {}
        specs.append(PassSpec(name, options, column))
        if sc.peek() == "":
            return specs
        sc.expect(",", "',' between passes or the end of the spec")


def _file_item(item: Any, where: str) -> PassSpec:
    if isinstance(item, str):
        return PassSpec(item)
    if isinstance(item, Mapping) and "name" in item and set(item) <= {"name", "options"}:
        return PassSpec(str(item["name"]), dict(item.get("options") or {}))
    if isinstance(item, Mapping) and len(item) == 1:
        (name, options), = item.items()
        if options is None or isinstance(options, Mapping):
            return PassSpec(str(name), dict(options or {}))
    msg = (
        f"{where} must be a pass name, {{'name': ..., 'options': {{...}}}} or "
        f"{{pass-name: {{options}}}}; got {item!r}."
    )
    raise ValueError(msg)


def _read_document(path: Path) -> Any:
    """The parsed JSON or YAML document, or one ValueError sentence naming the file and the problem."""
    import yaml  # lazily: only spec files need it

    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except RecursionError:
        msg = f"Pass spec file {path} is nested too deeply to be a pipeline."
    except (ValueError, yaml.YAMLError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        msg = f"Pass spec file {path} is not valid {kind} ({first})."
    raise ValueError(msg)


def load_spec(path: str | os.PathLike) -> list[PassSpec]:
    """Reads a pipeline from a ``.json``, ``.yaml`` or ``.yml`` file.

    Args:
        path: the file.

    Returns:
        One PassSpec per pass, option values as the file typed them.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension or a malformed document.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Pass spec file '{path}' does not exist."
        raise FileNotFoundError(msg)
    if path.suffix not in (".json", ".yaml", ".yml"):
        msg = f"Pass spec file {path} must end in .json, .yaml or .yml; got '{path.suffix}'."
        raise ValueError(msg)
    doc = _read_document(path)
    if isinstance(doc, Mapping) and set(doc) == {"passes"}:
        doc = doc["passes"]
    if isinstance(doc, Mapping):
        doc = [{k: v} for k, v in doc.items()]
    if not isinstance(doc, list):
        msg = f"Pass spec file {path} must hold a list or mapping of passes; got {type(doc).__name__}."
        raise ValueError(msg)
    return [_file_item(item, f"{path} item {i}") for i, item in enumerate(doc)]


# ---- option conversion, driven by the config dataclass field types ----


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _describe(a) for a in args)
    if origin in (tuple, list):
        elem = args[0] if args else None
        plural = {int: "ints", float: "floats", bool: "bools", str: "strings"}.get(elem, "values")
        return f"a list of {plural} like [0, 1]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of {" + ", ".join(str(m.value) for m in tp) + "}"
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert_scalar(value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        return _BOOL_WORDS[str(value).lower()] if isinstance(value, str) else _fail()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            _fail()
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            _fail()
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else _fail()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member or str(value).lower() in (str(member.value).lower(), member.name.lower()):
                return member
        _fail()
    if tp is Any:
        return value
    msg = f"Config field type {tp!r} is not supported by the spec parser."
    raise TypeError(msg)


def _fail() -> typing.NoReturn:
    raise ValueError


def _convert(value: Any, tp: Any) -> Any:
    """Converts a raw option value to ``tp``; raises bare ValueError/KeyError when it cannot."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or str(value).lower() in _NONE_WORDS):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except (ValueError, KeyError, TypeError):
                continue
        _fail()
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            _fail()
        if not args:
            elems = [Any] * len(value)
        elif origin is list or args[-1] is Ellipsis:
            elems = [args[0]] * len(value)
        elif len(args) == len(value):
            elems = list(args)
        else:
            _fail()
        items = [_convert(v, e) for v, e in zip(value, elems, strict=True)]
        return tuple(items) if origin is tuple else items
    return _convert_scalar(value, tp)


def build_config(pass_cls: type[Pass], options: Mapping[str, Any]) -> Any:
    """Builds ``pass_cls.config_class`` from raw options, converting by the field types.

    Raises:
        ValueError: unknown option, a value of the wrong type, or the config's own validation.
    """
    cfg_cls = pass_cls.config_class
    hints = typing.get_type_hints(cfg_cls)
    names = [f.name for f in dataclasses.fields(cfg_cls) if f.init]
    kwargs = {}
    for key, raw in options.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            msg = f"{pass_cls.name} has no option '{key}'; allowed options: {', '.join(names) or 'none'}.{hint}"
            raise ValueError(msg)
        try:
            kwargs[key] = _convert(raw, hints[key])
        except (ValueError, KeyError, TypeError):
            msg = f"{pass_cls.name} option '{key}' must be {_describe(hints[key])}; got {raw!r}."
            raise ValueError(msg) from None
    try:
        return cfg_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        msg = f"{pass_cls.name}: {exc}"
        raise type(exc)(msg) from exc


def _as_specs(spec: Any) -> list[Any]:
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and spec.strip().endswith((".json", ".yaml", ".yml"))
    ):
        return load_spec(spec)
    if isinstance(spec, str):
        return parse_spec(spec)
    if isinstance(spec, (Pass, PassSpec)):
        return [spec]
    if isinstance(spec, Sequence):
        return [x for item in spec for x in (parse_spec(item) if isinstance(item, str) else [item])]
    msg = f"A pipeline spec must be a string, a spec file path or a list of passes; got {type(spec).__name__}."
    raise TypeError(msg)


def build_passes(spec: Any, registry: Mapping[str, type[Pass]] | None = None) -> list[Pass]:
    """Turns a spec (text, file path, PassSpecs or Pass instances) into configured Pass objects."""
    passes = []
    for item in _as_specs(spec):
        if isinstance(item, Pass):
            passes.append(item)
            continue
        if not isinstance(item, PassSpec):
            msg = f"A pipeline item must be a Pass, a PassSpec or a pass name; got {type(item).__name__}."
            raise TypeError(msg)
        cls = get_pass_class(item.name, registry)
        passes.append(cls(build_config(cls, item.options)))
    return passes
