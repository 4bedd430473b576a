"""What belongs to this run: its identity, the lock on the files it writes, and the marks that
say which paths it created.

The callback writes, truncates and deletes only files it created for *this* run. Three pieces
make that checkable:

- ``new_run_id``: a run's identity, made at a fresh start, saved in every checkpoint and
  restored on resume, written into every event-log record and trace line.
- ``RunLock``: an exclusive ``flock`` on a small lock file beside what a run writes (its log
  dir, its event log). A second process that would write there is refused at train begin; the
  lock goes with the process, so a killed run leaves nothing to clean up.
- ``mark_owned`` / ``owner_of``: a hidden sidecar file ``.<name>.spinal`` beside a path the
  callback created (the good checkpoint), naming the run. A path without it is the user's and is
  never replaced or removed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any, ClassVar

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock degrades to the run-identity checks
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("spinal_callback")
MARK_SUFFIX = ".spinal"


class RunConflictError(RuntimeError):
    """Another live process writes the files this run would write."""


def new_run_id() -> str:
    """A fresh run identity: 12 hexadecimal characters."""
    return uuid.uuid4().hex[:12]


class RunLock:
    """An exclusive lock on ``path`` for the life of a run (or of the process).

    Args:
        path: the lock file (created if missing; never deleted, which would race a new holder).
        run_id: written into the lock file, so that a refused run can name the holder.

    Raises:
        RunConflictError: another process holds the lock (the message names its pid, its run and
            what to do).
    """

    _held: ClassVar[dict[str, RunLock]] = {}
    """Locks held by this process, by path: a later run in the same process (a notebook that
    trains again after a crash) takes a lock over instead of being refused by itself."""

    def __init__(self, path: str | os.PathLike[str], run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._file: IO[str] | None = None
        key = os.path.abspath(self.path)
        previous = RunLock._held.get(key)
        if previous is not None:
            if previous.run_id != run_id:
                logger.warning(
                    "spinal-callback: %s was held by run %s in this process, which did not "
                    "end; run %s takes it over",
                    self.path,
                    previous.run_id,
                    run_id,
                )
            previous.release()
        self._acquire()
        RunLock._held[key] = self

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open while locked
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = _holder(file.read())
                file.close()
                raise RunConflictError(
                    f"spinal-callback: another run ({holder}) is writing to {self.path.parent}; "
                    "two runs there would interleave their traces and events. Give this run "
                    "its own log_dir= (and event_log=), or stop the other run first"
                ) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"run": self.run_id, "pid": os.getpid(), "since": time.time()}))
        file.flush()
        self._file = file

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        """Unlock (the file stays); calling it again does nothing."""
        file, self._file = self._file, None
        if file is None:
            return
        if RunLock._held.get(os.path.abspath(self.path)) is self:
            del RunLock._held[os.path.abspath(self.path)]
        file.close()


def lock_or_warn(path: str | os.PathLike[str], run_id: str) -> RunLock | None:
    """``RunLock(path, run_id)``; ``None``, with a warning, when the lock file cannot be written
    (a read-only or full log dir must not stop training: nothing else can be written there
    either).

    Raises:
        RunConflictError: another process holds it.
    """
    try:
        return RunLock(path, run_id)
    except OSError as error:
        logger.warning(
            "spinal-callback: cannot lock %s (%s); a second run writing there would not be "
            "detected",
            path,
            error,
        )
        return None


def _holder(text: str) -> str:
    try:
        record: Any = json.loads(text)
        return f"pid {record['pid']}, run {record['run']}"
    except (ValueError, KeyError, TypeError):
        return "unknown pid"


def mark_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar that marks ``path`` as created by a run: ``<parent>/.<name>.spinal``."""
    target = Path(path)
    return target.with_name(f".{target.name}{MARK_SUFFIX}")


def mark_owned(path: str | os.PathLike[str], run_id: str) -> None:
    """Write the sidecar of ``path`` naming ``run_id`` (before the path itself is created, so
    that a crash in between leaves a mark without a path, never a path without its mark).

    Raises:
        OSError: the sidecar cannot be written.
    """
    mark = mark_path(path)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"run": run_id, "path": Path(path).name}), encoding="utf-8")


def owner_of(path: str | os.PathLike[str]) -> str | None:
    """The run that created ``path`` (by its sidecar), or ``None`` for a path of the user's."""
    try:
        record = json.loads(mark_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("path") != Path(path).name:
        return None
    run = record.get("run")
    return run if isinstance(run, str) else None


def is_inside(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (after resolving links)."""
    child, parent = Path(path).resolve(), Path(directory).resolve()
    return child == parent or parent in child.parents


__all__ = [
    "RunConflictError",
    "RunLock",
    "is_inside",
    "lock_or_warn",
    "mark_owned",
    "mark_path",
    "new_run_id",
    "owner_of",
]
