"""What both adapters share: how their keyword arguments become a ``SpinalConfig``, which
event-log file each rank writes, and the rotation of the one good checkpoint."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from spinal_callback import distributed
from spinal_callback.config import SpinalConfig
from spinal_callback.events import EventLog

_DEFAULTS = {field.name: field.default for field in fields(SpinalConfig)}


def resolve_config(
    config: SpinalConfig | Mapping[str, Any] | None,
    explicit: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> SpinalConfig:
    """``config`` (a ``SpinalConfig``, a dict of its fields or ``None``), then the explicit
    keyword arguments that differ from their field's default, then ``**overrides``.

    Raises:
        TypeError: ``config`` is of another type, or an override names no field.
        ValueError: a field's value is out of range (``SpinalConfig`` says which).
    """
    if isinstance(config, SpinalConfig):
        base = config
    elif config is None or isinstance(config, Mapping):
        base = SpinalConfig(**dict(config or {}))
    else:
        raise TypeError(
            f"config must be a SpinalConfig, a dict of its fields or None, got "
            f"{type(config).__name__}"
        )
    changed = {name: value for name, value in explicit.items() if value != _DEFAULTS[name]}
    return base.with_overrides(**changed, **overrides)


def rank_event_log(config: SpinalConfig, log_dir: str) -> EventLog:
    """``config.event_log`` (else ``<log_dir>/spinal_events.jsonl``) on rank 0, and
    ``<stem>.rank<k>.jsonl`` beside it on rank ``k``, so an alert raised on one rank only is on
    disk too."""
    main_log = os.fspath(config.event_log or os.path.join(log_dir, "spinal_events.jsonl"))
    rank = distributed.rank()
    if rank == 0:
        return EventLog(main_log)
    root, _ = os.path.splitext(main_log)
    return EventLog(f"{root}.rank{rank}.jsonl")


class GoodCheckpoint:
    """One checkpoint from before the trouble, at most two on disk.

    A quiet probe cannot vouch for its own step: the logs of that same step, scored after it, may
    raise the first warning. So each quiet probe writes a *candidate* and promotes the previous
    candidate, which a later quiet probe has now vouched for, to ``path``.

    Args:
        path: where the good checkpoint lives (a file or a directory, as ``save`` writes it).
        save: writes a checkpoint to the path it is given.
        is_main: this process renames the files (the main process when only it writes).
    """

    def __init__(self, path: str, save: Callable[[str], None], is_main: bool = True) -> None:
        self.path = os.fspath(path)
        self.candidate = self.path + ".candidate"
        self.save = save
        self.is_main = is_main
        self.candidate_step: int | None = None

    def rotate(self, step: int) -> int | None:
        """Promote the previous candidate to ``path`` and save a new candidate at ``step``;
        returns the promoted candidate's step (``None`` at the first call).

        Raises:
            OSError: from writing or renaming (the caller logs it; training goes on).
        """
        promoted = None
        if self.candidate_step is not None and self.is_main:
            _swap_into(self.candidate, self.path)
            promoted = self.candidate_step
        elif self.candidate_step is not None:
            promoted = self.candidate_step
        self.candidate_step = None
        self.save(self.candidate)
        self.candidate_step = step
        return promoted


def _swap_into(source: str, target: str) -> None:
    """Rename ``source`` over ``target`` (files or directories), never leaving neither."""
    if os.path.isdir(source):
        old = target + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
