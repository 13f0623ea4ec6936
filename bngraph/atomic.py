"""Outputs appear whole or not at all: write beside the target, then rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from bngraph.errors import UserError


def _sibling(path: Path, kind: str) -> Path:
    # Keep the suffix: onnx.save and savefig choose the format from it.
    return path.with_name(f".{path.stem}.{os.getpid()}.{kind}{path.suffix}")


def check_writable(path: str | Path) -> None:
    """Fail before the work, not after it, when `path` cannot be written."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: folder {parent} is not writable")


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it onto `path`."""
    path = Path(path)
    check_writable(path)
    tmp = _sibling(path, "partial")
    try:
        write(tmp)
        os.replace(tmp, path)  # same folder, same filesystem: the rename is atomic
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dir_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Build a folder as a temporary sibling, then move it onto `path` (replacing an old one)."""
    path = Path(path)
    check_writable(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write folder {path}: a file of that name exists")
    tmp = _sibling(path, "partial")
    old = _sibling(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            # A folder cannot be replaced in one rename: move the old one aside first, so that
            # `path` is missing for an instant but never half-written.
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
