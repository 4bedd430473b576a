"""What both adapters share, written once: their options (a typed signature that LightningCLI
and jsonargparse read through each adapter's ``**options``), how the options become a
``SpinalConfig``, the event-log file of each rank, the good checkpoint, and a new ``Runner``
for every training run."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from torch import nn

from spinal_callback import distributed
from spinal_callback.config import ProbeCadence, SpinalConfig, StopLevel
from spinal_callback.monitor.alerts import Alert
from spinal_callback.outputs.event_log import DEFAULT_NAME, EventLog
from spinal_callback.outputs.sinks import AlertHook, Outputs
from spinal_callback.probe.trace import DepthTrace
from spinal_callback.training.good_checkpoint import (
    GoodCheckpoint,
    check_keep_good_checkpoint,
    rotate_good_checkpoint,
)
from spinal_callback.training.runner import Runner

logger = logging.getLogger("spinal_callback")

_DEFAULTS = {field.name: field.default for field in fields(SpinalConfig)}


class SpinalOptions:
    """The options both callbacks take, and what both do with them.

    Args:
        config: a ``SpinalConfig`` (a dict of its fields also works); the keywords below apply
            on top.
        probe_texts: probe texts; ``None`` takes the ``prompt`` column of the train dataset.
        neutral_texts: neutral text the run does not train on, probed in the same forward
            (``None``: ``texts.DEFAULT_NEUTRAL_TEXTS``, plain English).
        on_alert: called with each ``Alert``; an exception it raises is logged, not propagated.
        log_dir: where TensorBoard and the event log go (``None``: the framework's run folder,
            see each callback).
        every_n_steps, stop_on, late_layers, event_log, drift_every: the ``SpinalConfig``
            fields users set most; a value equal to the field's default leaves ``config`` as is.
        keep_good_checkpoint: a new path that always holds a checkpoint from a probe that a
            later quiet probe vouched for, while no rank has warned; at most two copies on disk
            (``GoodCheckpoint``). ``None``: off.
        **config_overrides: any other ``SpinalConfig`` field.

    Bad configuration raises here, or at train begin, before the first step.
    """

    def __init__(
        self,
        config: SpinalConfig | None = None,
        probe_texts: Sequence[str] | None = None,
        neutral_texts: Sequence[str] | None = None,
        on_alert: AlertHook | None = None,
        log_dir: str | None = None,
        every_n_steps: ProbeCadence = SpinalConfig.every_n_steps,
        stop_on: StopLevel | None = SpinalConfig.stop_on,
        late_layers: list[int] | None = SpinalConfig.late_layers,
        event_log: str | None = SpinalConfig.event_log,
        drift_every: int | None = SpinalConfig.drift_every,
        keep_good_checkpoint: str | None = None,
        **config_overrides: Any,
    ) -> None:
        explicit = {
            "every_n_steps": every_n_steps,
            "stop_on": stop_on,
            "late_layers": late_layers,
            "event_log": event_log,
            "drift_every": drift_every,
        }
        self.config = resolve_config(config, explicit, config_overrides)
        self.log_dir = log_dir
        check_keep_good_checkpoint(keep_good_checkpoint)
        self.keep_good_checkpoint = keep_good_checkpoint
        self._new_runner = functools.partial(
            Runner,
            self.config,
            probe_texts,
            neutral_texts,
            on_alert,
            keep_good_checkpoint=keep_good_checkpoint is not None,
        )
        self.runner = self._new_runner()
        self._good: GoodCheckpoint | None = None

    @property
    def traces(self) -> list[DepthTrace]:
        """The ``DepthTrace``s of the current probe (restored ones included after a resume)."""
        return self.runner.traces

    @property
    def alerts(self) -> list[Alert]:
        """The ``Alert``s raised in this process."""
        return self.runner.alerts

    def _start_run(self, writes_into: Sequence[str | os.PathLike[str] | None]) -> bool:
        """A training run begins: a new ``Runner`` if this one already had a run; refuse a
        good-checkpoint path that is (or holds) a folder the run writes into. Returns whether
        the runner is new."""
        fresh = self.runner.begun
        if fresh:
            self.runner = fresh_runner(self.runner, self._new_runner)
            self._good = None
        check_keep_good_checkpoint(
            self.keep_good_checkpoint, [*writes_into, self.log_dir, self.config.event_log]
        )
        return fresh

    def _outputs(self, board: Any, log_dir: str, owns_board: bool) -> Outputs:
        """The sinks of this rank: ``board`` (rank zero) and this rank's event log."""
        return Outputs(board, rank_event_log(self.config, log_dir), owns_board=owns_board)

    def _prepare_good(self, save: Callable[[str], None], is_main: bool) -> None:
        """At train begin (after a resume's state is restored, so the run is known): the good
        checkpoint, refusing now a path that is not this run's (``GoodCheckpoint``)."""
        if self.keep_good_checkpoint is not None and self._good is None:
            run = self.runner.run_id
            self._good = GoodCheckpoint(self.keep_good_checkpoint, save, is_main, run)

    def _rotate_good(self, step: int) -> None:
        """Rotate the good checkpoint prepared at train begin."""
        if self._good is None:
            return
        promoted = rotate_good_checkpoint(self._good, step, self.runner.reduce_any)
        if promoted is not None:
            self.runner.saved(promoted, self._good.path)


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
    main_log = os.fspath(config.event_log or os.path.join(log_dir, DEFAULT_NAME))
    rank = distributed.rank()
    if rank == 0:
        return EventLog(main_log)
    root, _ = os.path.splitext(main_log)
    return EventLog(f"{root}.rank{rank}.jsonl")


def check_reference_argument(reference: object) -> None:
    """Refuse a ``ref_model`` that is not a model, at construction.

    Raises:
        TypeError: not an ``nn.Module`` (a path names how to load it).
    """
    if reference is None or isinstance(reference, nn.Module):
        return
    hint = ""
    if isinstance(reference, (str, os.PathLike)):
        hint = (
            f"; load it first, e.g. ref_model=AutoModelForCausalLM.from_pretrained("
            f"{os.fspath(reference)!r}) or spinal_callback.probe.loading.load_local_model(...)"
        )
    raise TypeError(
        f"ref_model must be a model (torch.nn.Module) or None, got {type(reference).__name__}"
        + hint
    )


def fresh_runner(previous: Runner, make: Callable[[], Runner]) -> Runner:
    """A new ``Runner`` for a new training run of the same callback (``train()`` or ``fit()``
    called again, or the callback given to another trainer): its own identity, reference,
    schedule and files. The previous run's locks are released."""
    previous.release()
    runner = make()
    stopped = f", stopped by {previous.stop_requested.rule}" if previous.stop_requested else ""
    logger.warning(
        "spinal-callback: this callback already watched run %s (last probe at step %d%s); a new "
        "training run starts as run %s, with its own reference, schedule and files",
        previous.run_id,
        previous.last_probe_step,
        stopped,
        runner.run_id,
    )
    return runner
