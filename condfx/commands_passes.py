"""``condfx passes [NAME] [--json]``: every pass of the registry with what it does, whether it is
exact, what it needs to be faithful, and its options (type, bounds, default), all read from the
registry (``passes/registry.PASSES``), the pass classes and their config dataclasses and bounds
tables (``condfx.options``); nothing here is written by hand but the ``NEEDS`` fallback."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import sys
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from rich.console import Console
from rich.table import Table

from condfx.options import Bool, Float, Int, OneOf, Optional

_OUT = Console()
_BOUND_TYPES = (Int, Float, Bool, OneOf, Optional)

NEEDS = MappingProxyType({
    "route-attention": ("training (the L2A router: condfx.l2a.train_l2a); form=select: calibration "
                        "(oracle-taught routers: condfx.l2a_retrofit.calibrate_select)"),
    "prune-global": "calibration (routing statistics: condfx.l2a.record_route_stats)",
    "skip-ffn": "calibration (similarity threshold: condfx calibrate); policy=forecast: training",
    "quantize-kv": "nothing (latent=klt: calibration, condfx.kv_calibrate.record_kv_stats)",
    "interleave-heads": "training (fine-tuning recovers the pseudo-heads)",
})
"""What a lossy pass needs to be faithful, where the pass class does not say (``needs``)."""


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "{" + ", ".join(str(m.value) for m in tp) + "}"
    return getattr(tp, "__name__", str(tp))


def _bound_text(bound: Any) -> str:
    if isinstance(bound, str):
        return bound
    if isinstance(bound, Optional):
        return f"None or {_bound_text(bound.inner)}"
    if isinstance(bound, Int):
        return f"[{bound.low}, {bound.high}]"
    if isinstance(bound, Float):
        return bound.describe().replace("a number in ", "")
    if isinstance(bound, OneOf):
        return "one of {" + ", ".join(str(m.value) for m in bound.cls) + "}"
    return "true or false" if isinstance(bound, Bool) else ""


def _bounds(config_class: type) -> dict[str, Any]:
    """The bounds tables of the config's module: ``{field: bound}`` mappings of ``condfx.options``,
    and ``{field: text}`` mappings for what ``__post_init__`` checks in words."""
    module = sys.modules.get(config_class.__module__)
    names = {f.name for f in dataclasses.fields(config_class)}
    found: dict[str, Any] = {}
    for value in vars(module).values() if module else ():
        if isinstance(value, Mapping) and value and set(value) <= names and all(
                isinstance(b, (*_BOUND_TYPES, str)) for b in value.values()):
            found.update(value)
    return found


def _attribute_docs(config_class: type) -> dict[str, str]:
    """``name: text`` lines of the config docstring's Attributes section (first line of each)."""
    docs, inside = {}, False
    for line in (config_class.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            inside = True
        elif inside and ":" in text and not line.startswith(" " * 12):
            name, _, rest = text.partition(":")
            for each in name.split(","):
                docs[each.strip()] = rest.strip()
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    return value.value if isinstance(value, enum.Enum) else value


def describe_pass(name: str, cls: type) -> dict[str, Any]:
    """What ``condfx passes`` shows of one pass, as a JSON-ready dict."""
    config = getattr(cls, "config_class", None)
    hints = typing.get_type_hints(config) if config else {}
    bounds = _bounds(config) if config else {}
    docs = _attribute_docs(config) if config else {}
    options = [{"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": _default(f),
                "bounds": _bound_text(bounds[f.name]) if f.name in bounds else "", "help": docs.get(f.name, "")}
               for f in (dataclasses.fields(config) if config else ())]
    exact = bool(getattr(cls, "exact", False))
    needs = getattr(cls, "needs", None)
    needs = getattr(needs, "value", needs)
    if needs in (None, "", "none"):  # the pass class does not say: the fallback table
        needs = "nothing" if exact else NEEDS.get(name, "nothing")
    about = _first_line(cls.__doc__).replace("``", "")
    about = about[len(name) + 2:] if about.startswith(f"{name}: ") else about
    return {"name": name, "description": about, "exact": exact, "needs": str(needs),
            "matches": getattr(cls, "matches", ""), "options": options}


def _print(entries: list[dict[str, Any]], detail: bool) -> None:
    if not detail:
        table = Table(title="condfx passes (condfx passes NAME shows one, with its options)")
        for col in ("pass", "what it does", "exact", "needs", "options"):
            table.add_column(col)
        for e in entries:
            table.add_row(e["name"], e["description"], "exact" if e["exact"] else "lossy", e["needs"],
                          ", ".join(o["name"] for o in e["options"]) or "-")
        _OUT.print(table)
        return
    for e in entries:
        _OUT.print(f"[bold]{e['name']}[/bold]: {e['description']}", highlight=False)
        _OUT.print(f"  {'exact' if e['exact'] else 'lossy'}; needs {e['needs']}; matches {e['matches']}",
                   highlight=False)
        table = Table()
        for col in ("option", "type", "bounds", "default", "meaning"):
            table.add_column(col)
        for o in e["options"]:
            table.add_row(o["name"], o["type"], o["bounds"], repr(o["default"]), o["help"])
        _OUT.print(table if e["options"] else "  no options")


def passes_cmd(args: argparse.Namespace) -> dict[str, Any] | None:
    """Lists the registry's passes, or shows the pass ``args.name``."""
    from condfx.passes.registry import PASSES

    if args.name is not None and args.name not in PASSES:
        close = difflib.get_close_matches(args.name, list(PASSES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        msg = f"Unknown pass '{args.name}'; the passes are {', '.join(sorted(PASSES))}.{hint}"
        raise ValueError(msg)
    chosen = [args.name] if args.name else list(PASSES)
    entries = [describe_pass(n, PASSES[n]) for n in chosen]
    if args.json:
        return {"passes": entries}
    _print(entries, detail=args.name is not None)
    return None
