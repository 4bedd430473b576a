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

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from spinal_callback.config import SpinalConfig
from spinal_callback.integrations.common import SpinalOptions
from spinal_callback.monitor.ramp_monitor import scalar_logs
from spinal_callback.outputs.sinks import AlertHook
from spinal_callback.outputs.tensorboard import TraceBoard
from spinal_callback.probe.sharding import attach_root
from spinal_callback.training.recovery import TrainingState, sharded_engine_reason
from spinal_callback.training.stop_ledger import Decision

REFERENCE_ATTRIBUTES = ("ref_model", "reference", "reference_model")


class SpinalCallback(SpinalOptions, pl.Callback):
    """Probe late-layer depth traces during Lightning training; alert, and stop (or recover:
    ``on_critical="recover"``) on ``stop_on``.

    Every argument is typed, so ``LightningCLI`` builds the callback from YAML or from
    ``--trainer.callbacks.every_n_steps=50`` (and ``config`` as a ``SpinalConfig``).

    Args:
        config: a ``SpinalConfig``; the options below apply on top.
        tokenizer: a tokenizer, or a local directory to load one from; ``None`` uses
            ``pl_module.tokenizer``.
        model_attr: attribute of the ``LightningModule`` holding the policy causal LM.
        probe_texts: probe texts (``None``: the ``prompt`` field of the datamodule's or the
            module's ``train_dataset``).
        log_dir: our own writer's directory when the trainer has no ``TensorBoardLogger``
            (``None``: ``<default_root_dir>/spinal``).
        on_alert: as ``SpinalOptions``.
        **options: the other ``SpinalOptions``: ``neutral_texts``, ``every_n_steps``,
            ``stop_on``, ``late_layers``, ``event_log``, ``drift_every``,
            ``keep_good_checkpoint`` (a ``.ckpt`` path) and any other ``SpinalConfig`` field.

    TensorBoard gets every probe from the ``TraceBoard``; the trainer's other loggers get the
    summaries of each probe through ``log_metrics`` at the probe's step. ``TensorBoardLogger``s
    get no forwarded scalar: the board already charts it, in the first one's run.

    The reference traced once as the baseline is ``pl_module.ref_model`` / ``.reference`` /
    ``.reference_model`` when present, else the PEFT policy with adapters disabled, else the
    first trace.
    """

    def __init__(
        self,
        config: SpinalConfig | None = None,
        probe_texts: Sequence[str] | None = None,
        tokenizer: Any = None,
        model_attr: str = "model",
        log_dir: str | None = None,
        on_alert: AlertHook | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            config=config, probe_texts=probe_texts, log_dir=log_dir, on_alert=on_alert, **options
        )
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self._last_logs_step = -1
        self._metrics_seen: dict[str, float] = {}
        self._checkpoints_seen: set[str] = set()
        self._saving_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.config.on_critical == "recover":
            reason = sharded_engine_reason([type(trainer.strategy).__name__])
            if reason is not None:
                raise ValueError(reason)
        loggers = [x.log_dir for x in trainer.loggers if isinstance(x, TensorBoardLogger)]
        if self._start_run([trainer.default_root_dir, self._own_log_dir(trainer), *loggers]):
            self._last_logs_step, self._metrics_seen = -1, {}
            self._checkpoints_seen, self._saving_step = set(), None
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
        outputs = self._outputs(board, log_dir, owned)
        step = trainer.global_step
        self._prepare_good(trainer.save_checkpoint, trainer.is_global_zero)
        if self.config.on_critical == "recover":
            self.runner.watch_training(_training_state(trainer, pl_module))
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
        if decision.save_good:
            self._rotate_good(step)
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
        scalars = scalar_logs(trainer.callback_metrics)
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
            from spinal_callback.probe.loading import load_local_tokenizer

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


def _training_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrainingState:
    """What a recovery restores: the module's trainable parameters, the trainer's optimizers,
    their schedulers and the precision plugin's gradient scaler (16-mixed)."""
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return TrainingState.of(pl_module, trainer.optimizers, schedulers, [scaler])


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
    if every > 0:
        return every
    return config.auto_min_steps if config.every_n_steps == "auto" else int(config.every_n_steps)


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
