"""How an exception becomes the one sentence the CLI prints.

condfx's own errors (``ValueError``, ``PassError``, ``LoadError``, ...) already are one sentence
naming the option or file. Errors from the libraries condfx calls on a user's files (safetensors,
yaml, json, onnx, onnxruntime, transformers, the OS) are not: they are often several lines and
rarely name the file. ``reading(what)`` wraps the code that reads one user file and turns such an
error into an ``InputError`` naming ``what``; ``explain`` gives the CLI's line and exit status for
anything that still escapes (exit 2 for bad input, 1 with "internal error" for a condfx bug).

``check_output``, ``check_input_file`` and ``read_text`` check the CLI's file arguments before any
work starts, in the same sentences. This module imports nothing from condfx, so every layer that
reads user files may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

DEBUG_VARIABLE = "CONDFX_DEBUG"
_MAX_CHARS = 300
# Built-in types condfx raises for bad input; its own exception classes count too (_is_own).
_USER_TYPES = (ValueError, TypeError, OSError)


class InputError(ValueError):
    """A user's file or folder could not be read; the message names it and says why."""


def _raised_in_condfx(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is condfx code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("condfx")


def _is_own(exc: BaseException) -> bool:
    """Whether ``exc`` is one of condfx's sentences (its own class, or a built-in one it raised)."""
    if type(exc).__module__.startswith("condfx"):
        return True
    return isinstance(exc, _USER_TYPES) and _raised_in_condfx(exc)


def _shorten(line: str) -> str:
    """At most _MAX_CHARS, cut in the middle: a sentence's subject and its reason both stay."""
    if len(line) <= _MAX_CHARS:
        return line
    half = (_MAX_CHARS - 5) // 2
    return f"{line[:half]} ... {line[-half:]}"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return _shorten(re.sub(r"\s+", " ", lines[0])) if lines else ""


def _os_reason(exc: OSError) -> str:
    name = exc.filename
    if name is None:
        return _first_line(exc.strerror or str(exc))
    reasons = {
        IsADirectoryError: f"'{name}' is a folder, not a file",
        NotADirectoryError: f"'{name}' is not a folder (or a part of its path is a file)",
        PermissionError: f"no permission to use '{name}'",
        FileNotFoundError: f"'{name}' does not exist",
        FileExistsError: f"'{name}' already exists",
    }
    return reasons.get(type(exc), f"'{name}': {exc.strerror or exc}")


def describe(exc: BaseException) -> str:
    """A short clause for ``exc`` (no final period), whoever raised it.

    Args:
        exc: the exception.

    Returns:
        e.g. ``"not valid JSON (Expecting value at line 1, column 1)"`` or, for condfx's own
        errors, the first line of their message.
    """
    if _is_own(exc):
        return _first_line(str(exc)).rstrip(".")
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    mark = getattr(exc, "problem_mark", None)
    if type(exc).__module__.startswith("yaml") and mark is not None:
        problem = getattr(exc, "problem", None) or "malformed"
        return f"not valid YAML ({problem} at line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(exc, RecursionError):
        return "nested too deeply to read (deeper than Python's recursion limit)"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory (ask for smaller sizes or a smaller model)"
    if isinstance(exc, OSError):
        return _os_reason(exc)
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}" if exc.args else "missing key"
    text = _first_line(str(exc)).rstrip(".")
    if isinstance(exc, (ValueError, TypeError)):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Turns any error but condfx's own sentences, raised while reading ``what``, into InputError.

    Args:
        what: the thing read, as the sentence should name it, e.g. ``"pass spec file 'p.yaml'"``.

    Raises:
        InputError: "Could not read {what}: {why}." (the original error is its ``__cause__``).
    """
    try:
        yield
    except Exception as exc:
        if _is_own(exc):
            raise
        msg = _shorten(f"Could not read {what}: {describe(exc)}.")
        raise InputError(msg) from exc


def explain(exc: BaseException) -> tuple[str, int]:
    """The one line the CLI prints for an exception that reached it, and the exit status.

    Args:
        exc: the exception.

    Returns:
        ``(line, status)``: status 2 for bad input (condfx's sentences, the user-error types,
        files, memory and nesting limits), 130 for Ctrl-C, and 1 for anything else (a bug in
        condfx: the line ends "; set CONDFX_DEBUG=1 for the traceback" and the CLI prefixes it
        with "internal error: ").
    """
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted.", 130
    if _is_own(exc):
        return _first_line(str(exc)), 2
    if isinstance(exc, (*_USER_TYPES, RecursionError, MemoryError)) or (
        type(exc).__name__ == "OutOfMemoryError"
    ):
        line = _shorten(describe(exc))
        return line[:1].upper() + line[1:] + ("" if line.endswith((".", "?", "!")) else "."), 2
    return f"{_shorten(describe(exc))}; set {DEBUG_VARIABLE}=1 for the traceback.", 1


def check_output(path: str | os.PathLike, flag: str, *, folder: bool) -> Path:
    """Refuses an output path that cannot be written, before any work starts.

    Args:
        path: the output file or folder.
        flag: the option that named it, for the sentence (e.g. ``"-o"``).
        folder: whether a folder (created later with its parents) or a file (in an existing folder).

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: a file where a folder belongs or the reverse, a missing or unwritable folder.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        msg = f"{flag} '{path}' is a file; {flag} names the folder to write into."
        raise InputError(msg)
    if not folder and path.is_dir():
        msg = f"{flag} '{path}' is a folder; {flag} names the file to write."
        raise InputError(msg)
    parent = path if folder else path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        msg = f"{flag} '{path}' cannot be written: '{existing}' is a file, not a folder."
        raise InputError(msg)
    if not folder and existing != parent:
        msg = f"{flag} '{path}' cannot be written: its folder '{parent}' does not exist."
        raise InputError(msg)
    if not os.access(existing, os.W_OK | os.X_OK):  # root passes; the write itself then fails
        msg = f"{flag} '{path}' cannot be written: folder '{existing}' is not writable."
        raise InputError(msg)
    return path


def check_input_file(path: str | os.PathLike, flag: str, what: str) -> Path:
    """An existing file named by ``flag`` (``what`` begins the sentence, e.g. "Text file").

    Raises:
        InputError: the path is a folder.
        FileNotFoundError: nothing is there.
    """
    path = Path(path)
    if path.is_dir():
        msg = f"{what} '{path}' ({flag}) is a folder; {flag} names a file."
        raise InputError(msg)
    if not path.is_file():
        msg = f"{what} '{path}' does not exist."
        raise FileNotFoundError(msg)
    return path


def read_text(path: Path) -> str:
    """The UTF-8 text of a user's text file, which must not be empty (InputError otherwise)."""
    with reading(f"text file '{path}'"):
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        msg = f"Text file '{path}' is empty; it must hold UTF-8 text to score or calibrate on."
        raise InputError(msg)
    return text
