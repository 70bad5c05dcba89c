"""Named pass pipelines for the goals users have, shipped as YAML beside this module.

A recipe file holds ``description`` (one paragraph) and ``passes``: a list of pass names or
``{pass-name: {option: value}}`` items, in pipeline order. ``condfx optimize MODEL --recipe NAME``
(and ``generate`` / ``export``) run ``spec_text(NAME)``; NAME is a recipe name (``names()``) or the
path of a recipe file of the same form.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Recipe", "load", "names", "spec_text"]

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """One recipe: its name, description and pass spec text (``name{option=value,...}, ...``)."""

    name: str
    description: str
    spec: str


def names() -> tuple[str, ...]:
    """The recipes shipped with condfx, sorted."""
    return tuple(sorted(p.stem for p in HERE.glob("*.yaml")))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def _item(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and len(item) == 1:
        (name, options), = item.items()
        if options is None:
            return str(name)
        if isinstance(options, Mapping):
            inner = ",".join(f"{k}={_value(v)}" for k, v in options.items())
            return f"{name}{{{inner}}}"
    msg = f"{where} must be a pass name or {{pass-name: {{option: value}}}}; got {item!r}."
    raise ValueError(msg)


def _path(name: str) -> Path:
    shipped = HERE / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    msg = (f"Unknown recipe '{name}'; the recipes are {', '.join(names())}, or give the path of a "
           ".yaml recipe file.")
    raise ValueError(msg)


def load(name: str) -> Recipe:
    """The recipe ``name`` (a shipped recipe, or a path to a recipe file).

    Raises:
        ValueError: an unknown name (the message lists the recipes) or a malformed file.
    """
    import yaml  # lazily: only recipes need it

    path = _path(str(name))
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, ValueError) as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        msg = f"Recipe file {path} is not valid YAML ({first})."
        raise ValueError(msg) from None
    passes = doc.get("passes") if isinstance(doc, Mapping) else None
    if not isinstance(passes, list) or not passes:
        msg = f"Recipe file {path} must hold a non-empty 'passes' list (and a 'description')."
        raise ValueError(msg)
    spec = ", ".join(_item(item, f"{path} pass {i + 1}") for i, item in enumerate(passes))
    return Recipe(path.stem, str(doc.get("description", "")).strip(), spec)


def spec_text(name: str) -> str:
    """The pass spec text of recipe ``name`` (see ``load``)."""
    return load(name).spec


def passes_of(args: Any) -> str | None:
    """The CLI's pipeline: ``--passes`` when given, else the spec of ``--recipe``, else None."""
    recipe = getattr(args, "recipe", None)
    return spec_text(recipe) if recipe and not getattr(args, "passes", None) else getattr(args, "passes", None)
