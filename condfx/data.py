"""The one data setting: where the reference data files live, and hash-checked access to them.

The data folder is ``$CONDFX_DATA`` when set, else ``../shared/data`` beside the checkout (or
beside the current directory). Every file is checked against the ``SHA256SUMS`` list in that
folder; a hash is computed once per process for a given (path, mtime, size).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

ENV_VAR = "CONDFX_DATA"
SUMS_FILE = "SHA256SUMS"


class DataFileError(ValueError):
    """A data file is unlisted in SHA256SUMS, or its hash does not match."""


def data_dir() -> Path:
    """Return the folder that holds the reference data.

    Returns:
        ``$CONDFX_DATA`` if set, else the first existing ``../shared/data`` beside the repository
        root or beside the current working directory.

    Raises:
        FileNotFoundError: no data folder was found.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            msg = f"{ENV_VAR} points to {path}, which is not a folder; set it to the data folder."
            raise FileNotFoundError(msg)
        return path
    repo = Path(__file__).resolve().parent.parent
    for candidate in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    msg = (
        f"No data folder found (looked for ../shared/data beside {repo} and beside the cwd); "
        f"set {ENV_VAR} to the folder that holds the reference data files."
    )
    raise FileNotFoundError(msg)


@lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """Hash a file; cached per (path, mtime, size) so each file is hashed once per process."""
    del mtime_ns, size  # part of the cache key only
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA256 hex digest of ``path`` (cached while the file is unchanged)."""
    path = Path(path)
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _expected_hashes(folder: Path) -> dict[str, str]:
    sums = folder / SUMS_FILE
    if not sums.is_file():
        msg = f"{SUMS_FILE} is missing from the data folder {folder}; it lists the expected hashes."
        raise FileNotFoundError(msg)
    expected = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            expected[parts[1].lstrip("*")] = parts[0].lower()
    return expected


def data_file(name: str, check_hash: bool = True) -> Path:
    """Return the path of the data file ``name``, checked against ``SHA256SUMS``.

    Args:
        name: file name inside the data folder, e.g. ``"stories260K.bin"``.
        check_hash: verify the SHA256 hash (computed once per process per file version).

    Returns:
        The absolute path of the file.

    Raises:
        FileNotFoundError: the data folder, the file or ``SHA256SUMS`` is missing.
        DataFileError: the file is not listed in SHA256SUMS or its hash does not match.
    """
    folder = data_dir()
    path = folder / name
    if not path.is_file():
        msg = f"Data file {name!r} is missing from {folder}; restore it or set {ENV_VAR}."
        raise FileNotFoundError(msg)
    if not check_hash:
        return path
    expected = _expected_hashes(folder).get(name)
    if expected is None:
        msg = f"Data file {name!r} is not listed in {folder / SUMS_FILE}, so it cannot be checked."
        raise DataFileError(msg)
    actual = file_sha256(path)
    if actual != expected:
        msg = (
            f"Data file {name!r} in {folder} has SHA256 {actual}, expected {expected}; "
            "the file is corrupt or a different version."
        )
        raise DataFileError(msg)
    return path
