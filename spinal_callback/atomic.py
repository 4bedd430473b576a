"""Write-then-rename: a file or directory appears whole at its path, or not at all.

Every file the package replaces goes through ``replace_atomically``: the content is written to a
sibling ``.partial`` path, synced, renamed over the target, and the rename itself is synced
(the parent directory), so a crash at any moment leaves the old version or the new one, never
a torn file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """``write(partial)`` writes the new content (a file, or a directory of files) to
    ``partial``; it then replaces ``path``. Returns ``path``.

    Raises:
        OSError: writing, syncing or renaming failed (the ``.partial`` is removed; ``path`` is
            as it was).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    _remove(partial)
    try:
        write(partial)
        for file in [partial] if partial.is_file() else sorted(partial.rglob("*")):
            if file.is_file():
                sync_file(file)
        if target.is_dir() and partial.is_dir():
            _remove(target)
        os.replace(partial, target)
    finally:
        _remove(partial)
    sync_directory(target.parent)
    return target


def sync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def sync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable where the platform allows it (Windows cannot open
    a directory, and some file systems refuse to sync one: the files are synced already)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
