"""SpinalCallback: the runner inside a PyTorch Lightning DPO ``LightningModule``.

    trainer = lightning.Trainer(callbacks=[SpinalCallback(tokenizer=tokenizer, every_n_steps=50)])

The adapter only translates Lightning's events into ``Runner`` calls (ARCHITECTURE.md). It writes
to the trainer's ``TensorBoardLogger`` when it has one, to its own writer otherwise (global rank
zero), and takes the stop decision through the strategy, as ``EarlyStopping`` does.

Where the scalars go: ``TraceBoard`` charts the whole trace in the ``TensorBoardLogger``'s run (or
``<default_root_dir>/spinal``); the summaries (``spinal/ramp/*``, ``spinal/neutral/*``,
``spinal/alert_level``) also go, through ``log_metrics``, to every logger that is not a
``TensorBoardLogger`` (W&B, MLflow, CSV, ...), so TensorBoard charts each value once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from spinal_callback.config import SpinalConfig
from spinal_callback.integrations.common import (
    GoodCheckpoint,
    check_keep_good_checkpoint,
    fresh_runner,
    rank_event_log,
    resolve_config,
    rotate_good_checkpoint,
)
from spinal_callback.outputs import AlertHook, Outputs
from spinal_callback.runner import Decision, Runner
from spinal_callback.sharding import attach_root
from spinal_callback.tensorboard import TraceBoard

_log = logging.getLogger("spinal_callback")
REFERENCE_ATTRIBUTES = ("ref_model", "reference", "reference_model")


class SpinalCallback(pl.Callback):
    """Probe late-layer depth traces during Lightning training; alert, and stop on ``stop_on``.

    Every argument is a plain type, so ``LightningCLI`` builds the callback from YAML or from
    ``--trainer.callbacks.every_n_steps=50``.

    Args:
        config: a ``SpinalConfig`` or a dict of its fields; the keywords below apply on top.
        probe_texts: probe texts; ``None`` takes the ``prompt`` field of the datamodule's (or the
            module's) ``train_dataset``.
        tokenizer: a tokenizer, or a local directory to load one from; ``None`` uses
            ``pl_module.tokenizer``.
        model_attr: attribute of the ``LightningModule`` holding the policy causal LM.
        log_dir: directory for our own writer when the trainer has no ``TensorBoardLogger``;
            ``None`` is ``<default_root_dir>/spinal``.
        on_alert: called with each ``Alert``; an exception it raises is logged, not propagated.
        neutral_texts: neutral text the run does not train on, probed in the same forward
            (``None``: ``texts.DEFAULT_NEUTRAL_TEXTS``, plain English).
        every_n_steps, stop_on, late_layers, event_log, drift_every: the ``SpinalConfig``
            fields users set most; a value equal to the field's default leaves ``config`` as is.
        keep_good_checkpoint: a ``.ckpt`` path that always holds a full checkpoint from a probe
            that a later quiet probe vouched for, while no rank has warned; at most two on disk
            (``GoodCheckpoint``), whatever the ``ModelCheckpoint`` settings. ``None``: off.
        **config_overrides: any other ``SpinalConfig`` field.

    TensorBoard gets every probe from the ``TraceBoard``; the trainer's other loggers get the
    summaries of each probe through ``log_metrics`` at the probe's step. ``TensorBoardLogger``s
    get no forwarded scalar: the board already charts it, in the first one's run.

    The reference traced once as the baseline is ``pl_module.ref_model`` / ``.reference`` /
    ``.reference_model`` when present, else the PEFT policy with adapters disabled, else the
    first trace.
    """

    def __init__(
        self,
        config: SpinalConfig | dict[str, Any] | None = None,
        probe_texts: Sequence[str] | None = None,
        tokenizer: Any = None,
        model_attr: str = "model",
        log_dir: str | None = None,
        on_alert: AlertHook | None = None,
        neutral_texts: Sequence[str] | None = None,
        every_n_steps: int = SpinalConfig.every_n_steps,
        stop_on: str | None = SpinalConfig.stop_on,
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
        self.tokenizer = tokenizer
        self.model_attr = model_attr
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
        self._last_logs_step = -1
        self._metrics_seen: dict[str, float] = {}
        self._checkpoints_seen: set[str] = set()
        self._good: GoodCheckpoint | None = None
        self._saving_step: int | None = None

    @property
    def traces(self) -> list[Any]:
        """The ``DepthTrace``s of the current probe (restored ones included after a resume)."""
        return self.runner.traces

    @property
    def alerts(self) -> list[Any]:
        """The ``Alert``s raised in this process."""
        return self.runner.alerts

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.runner.begun:
            self.runner = fresh_runner(self.runner, self._new_runner)
            self._last_logs_step, self._metrics_seen = -1, {}
            self._checkpoints_seen, self._good, self._saving_step = set(), None, None
        check_keep_good_checkpoint(
            self.keep_good_checkpoint,
            [trainer.default_root_dir, self._own_log_dir(trainer), self.config.event_log],
        )
        reference = next(
            (
                getattr(pl_module, a)
                for a in REFERENCE_ATTRIBUTES
                if isinstance(getattr(pl_module, a, None), nn.Module)
            ),
            None,
        )
        self.runner.setup(
            self._policy(pl_module),
            self._tokenizer(pl_module),
            _train_dataset(trainer, pl_module),
            reference,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach_sharding_root(trainer, pl_module)
        board, log_dir, owned = None, self._own_log_dir(trainer), False
        if trainer.is_global_zero:
            board, log_dir, owned = self._board(trainer)
        outputs = Outputs(board, rank_event_log(self.config, log_dir), owns_board=owned)
        step = trainer.global_step
        decision = self.runner.begin(step, outputs, log_dir, _strategy_reduce_any(trainer))
        self._forward_scalars(trainer, step)
        self._act(decision, trainer, step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        self._note_checkpoints(trainer)
        decision = self.runner.step(step)
        self._forward_scalars(trainer, step)
        self._act(decision, trainer, step)
        if step != self._last_logs_step and step % _log_cadence(trainer, self.config) == 0:
            self._last_logs_step = step
            self._act(self.runner.logs(step, self._fresh_metrics(trainer)), trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runner.end(trainer.global_step)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saving_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return self.runner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runner.load_state_dict(state_dict)

    def _act(self, decision: Decision, trainer: pl.Trainer, step: int) -> None:
        """On a stop: save ``spinal-stop-step=<step>.ckpt`` (every rank: a collective), stop.
        On ``save_good``: overwrite the good checkpoint."""
        if decision.save_good and self.keep_good_checkpoint is not None:
            if self._good is None:
                self._good = GoodCheckpoint(
                    self.keep_good_checkpoint,
                    trainer.save_checkpoint,
                    trainer.is_global_zero,
                    self.runner.run_id,
                )
            promoted = rotate_good_checkpoint(self._good, step)
            if promoted is not None:
                self.runner.saved(promoted, self.keep_good_checkpoint)
        if decision.stop and not trainer.should_stop:
            path = os.path.join(_checkpoint_dir(trainer), f"spinal-stop-step={step}.ckpt")
            trainer.save_checkpoint(path)
            self.runner.saved(step, path)
            trainer.should_stop = True

    def _forward_scalars(self, trainer: pl.Trainer, step: int) -> None:
        """The probe's scalars to the loggers other than ``TensorBoardLogger``s: the
        ``TraceBoard`` charts them already, and a second copy would be a second chart (another
        logger's run) or a second point at the same step (the board's own)."""
        scalars = self.runner.pop_scalars()
        if scalars and trainer.is_global_zero:
            for logger in trainer.loggers:
                if not isinstance(logger, TensorBoardLogger):
                    logger.log_metrics(scalars, step=step)

    def _note_checkpoints(self, trainer: pl.Trainer) -> None:
        """Tell the runner about checkpoint files the trainer's ``ModelCheckpoint``s wrote, at
        the step they were saved (``on_save_checkpoint`` noted it). Nothing to look at, and no
        file to stat, on the steps without a save."""
        if self._saving_step is None:
            return
        step, self._saving_step = self._saving_step, None
        for callback in trainer.checkpoint_callbacks:
            paths = [
                getattr(callback, "last_model_path", ""),
                getattr(callback, "best_model_path", ""),
            ]
            paths += list(getattr(callback, "best_k_models", {}) or {})
            for path in paths:
                if path and path not in self._checkpoints_seen and os.path.isfile(path):
                    self._checkpoints_seen.add(path)
                    self.runner.saved(step, str(path))

    def _fresh_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The logged scalars that changed since the last read: a metric logged once per epoch
        stays in ``callback_metrics`` unchanged and must not count as a new value each time."""
        scalars = _scalars(trainer.callback_metrics)
        fresh = {key: v for key, v in scalars.items() if self._metrics_seen.get(key) != v}
        self._metrics_seen = scalars
        return fresh

    def _attach_sharding_root(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``FSDPStrategy`` wraps the ``LightningModule`` after ``setup``: the root unit that
        holds the policy's embedding, norm and head is then ``strategy.model``, outside the
        policy. The probe gathers that root (``sharding``); nothing changes for other strategies.
        """
        root = getattr(trainer.strategy, "model", None)
        if not isinstance(root, nn.Module):
            return
        for probe in (self.runner.probe, self.runner.reference_probe):
            if probe is not None:
                attach_root(probe.model, root)

    def _policy(self, pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(
                f"{type(pl_module).__name__}.{self.model_attr} is not a model; the module's "
                f"submodules are {children}. Pass SpinalCallback(model_attr=...) naming the policy"
            )
        return model

    def _tokenizer(self, pl_module: pl.LightningModule) -> Any:
        tokenizer = (
            self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        )
        if isinstance(tokenizer, (str, os.PathLike)):
            from spinal_callback.loading import load_local_tokenizer

            tokenizer = load_local_tokenizer(os.fspath(tokenizer))
        return tokenizer

    def _own_log_dir(self, trainer: pl.Trainer) -> str:
        return self.log_dir or os.path.join(trainer.default_root_dir, "spinal")

    def _board(self, trainer: pl.Trainer) -> tuple[TraceBoard, str, bool]:
        """The TensorBoardLogger's writer and directory, else a writer of our own."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return TraceBoard(logger.experiment), logger.log_dir, False
        log_dir = self._own_log_dir(trainer)
        return TraceBoard.open(log_dir), log_dir, True


def _strategy_reduce_any(trainer: pl.Trainer) -> Any:
    """The strategy's boolean reduction (``EarlyStopping`` uses it): true everywhere if true on
    any rank."""

    def reduce_any(flag: bool) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))

    return reduce_any


def _log_cadence(trainer: pl.Trainer, config: SpinalConfig) -> int:
    """Steps between reads of the logged metrics: the trainer's ``log_every_n_steps``, or the
    probe cadence where logging is off."""
    every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
    return every if every > 0 else config.every_n_steps


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-element tensors and numbers among Lightning's ``callback_metrics``."""
    scalars = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[key] = float(value.detach().float().cpu())
        elif isinstance(value, (int, float)):
            scalars[key] = float(value)
    return scalars


def _train_dataset(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    for owner in (datamodule, pl_module):
        dataset = getattr(owner, "train_dataset", None)
        if dataset is not None:
            return dataset
    return None


def _checkpoint_dir(trainer: pl.Trainer) -> str:
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return str(dirpath) if dirpath else os.path.join(trainer.default_root_dir, "checkpoints")
