"""File handling shared by every stage: atomic writes, untrusted relative paths, quiet C I/O.

Every file a long job writes goes through :func:`write_atomic` (a temporary file next to
the target, fsync, then ``os.replace``), so a killed job never leaves half a file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:  # the data must be on disk before the rename
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=indent).encode())


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` with the atomic-write guarantee (checkpoints)."""
    import torch

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def check_plain_name(name: str, what: str = "name") -> str:
    """``name`` if it is one plain path component (no separators, not "." or ".."),
    else ValueError: names become directory names inside an output directory."""
    text = str(name) if name is not None else ""
    if (not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text
            or (os.altsep and os.altsep in text) or Path(text).name != text):
        raise ValueError(f"{what} {name!r} is not a single plain path component "
                         "(no '/', no '..', not empty); it names a directory inside the output directory")
    return text


def contained_path(base: str | os.PathLike, relative: Any, what: str, where: str) -> Path:
    """``base / relative`` for a relative path read from a file we do not trust (a data
    set index, a model manifest): absolute paths and paths that climb out of ``base``
    with ``..`` are refused (ValueError naming ``what`` and ``where``). The check is
    lexical, so symbolic links the user made inside ``base`` keep working."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what} must be a non-empty relative path string, got {relative!r}")
    normal = os.path.normpath(relative)
    if (os.path.isabs(relative) or Path(relative).drive or normal == ".."
            or normal.startswith(".." + os.sep) or normal == "."):
        raise ValueError(f"{what} {relative!r} points outside {where} {base}; refusing to follow it "
                         "(paths there must be relative and stay inside)")
    return Path(base) / normal


@contextlib.contextmanager
def quiet_stdout():
    """Silence C-level writes to stdout (file descriptor 1) for the duration."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (e.g. some notebook kernels): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
