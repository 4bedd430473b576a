"""SpinalCallback: the probe inside a PyTorch Lightning DPO ``LightningModule``.

    trainer = lightning.Trainer(callbacks=[SpinalCallback(tokenizer=tokenizer, every_n_steps=50)])

The adapter only decides when to probe (train start, every ``every_n_steps`` optimizer steps,
train end) and where to write (the trainer's ``TensorBoardLogger`` when it has one, its own
``SummaryWriter`` otherwise, on global rank zero); ``ProbeSession`` does the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from spinal_callback.config import SpinalConfig
from spinal_callback.session import AlertHook, ProbeSession
from spinal_callback.tensorboard import TraceBoard

REFERENCE_ATTRIBUTES = ("ref_model", "reference", "reference_model")


class SpinalCallback(pl.Callback):
    """Probe late-layer depth traces during Lightning training and write them to TensorBoard.

    Constructor arguments are plain types so ``LightningCLI`` YAML can build the callback.

    Args:
        config: a ``SpinalConfig`` or a dict of its fields; keyword overrides apply on top.
        probe_texts: probe texts; ``None`` takes the ``prompt`` field of the datamodule's (or the
            module's) ``train_dataset``.
        tokenizer: a tokenizer, or a local directory to load one from; ``None`` uses
            ``pl_module.tokenizer``.
        model_attr: attribute of the ``LightningModule`` holding the policy causal LM.
        log_dir: directory for our own ``SummaryWriter`` when the trainer has no
            ``TensorBoardLogger``; ``None`` is ``<default_root_dir>/spinal``.
        on_alert: called with each ``Alert``.
        neutral_texts: neutral text the run does not train on, probed in the same forward
            (``None``: ``texts.DEFAULT_NEUTRAL_TEXTS``, plain English).
        **config_overrides: ``SpinalConfig`` fields, e.g. ``every_n_steps=50``.

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
        **config_overrides: Any,
    ) -> None:
        base = config if isinstance(config, SpinalConfig) else SpinalConfig(**(config or {}))
        self.config = base.with_overrides(**config_overrides)
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.log_dir = log_dir
        self.neutral_texts = list(neutral_texts) if neutral_texts is not None else None
        self.session = ProbeSession(self.config, probe_texts, on_alert, self.neutral_texts)
        self._own_writer: Any = None
        self._last_logs_step = -1
        self._metrics_seen: dict[str, float] = {}

    @property
    def traces(self) -> list[Any]:
        """The ``DepthTrace``s recorded so far (restored ones included after a resume)."""
        return self.session.history

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = self._policy(pl_module)
        reference = next(
            (
                getattr(pl_module, a)
                for a in REFERENCE_ATTRIBUTES
                if isinstance(getattr(pl_module, a, None), nn.Module)
            ),
            None,
        )
        self.session.setup(
            model, self._tokenizer(pl_module), _train_dataset(trainer, pl_module), reference
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session.event_log is None:
            if trainer.is_global_zero:
                writer, log_dir = self._writer(trainer)
                self.session.attach_outputs(TraceBoard(writer), log_dir, trainer.global_step)
            else:
                log_dir = self.log_dir or os.path.join(trainer.default_root_dir, "spinal")
                self.session.attach_outputs(None, log_dir, trainer.global_step)
        if trainer.global_step == 0:
            self._probe(trainer, pl_module, 0)
            self._stop_if_asked(trainer, 0)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        probe_due = self.session.is_due(step)
        log_due = step != self._last_logs_step and step % _log_cadence(trainer, self.config) == 0
        if probe_due:
            self._probe(trainer, pl_module, step)
        if log_due:
            self._last_logs_step = step
            self.session.observe_logs(step, self._fresh_metrics(trainer))
        if probe_due or log_due:
            self._stop_if_asked(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = self.session
        # Every rank must take part (probe_at is a no-op where probing is off): decide_stop is a
        # collective.
        if session.last_probe_step != trainer.global_step:
            self._probe(trainer, pl_module, trainer.global_step)
            self._stop_if_asked(trainer, trainer.global_step)
        session.finish()
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Probe and feed the non-TensorBoard loggers."""
        trace = self.session.probe_at(self._policy(pl_module), step)
        logs = self.session.pop_pending_logs()
        if trace is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                if not isinstance(logger, TensorBoardLogger):
                    logger.log_metrics(logs, step=step)

    def _fresh_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The logged scalars that changed since the last read: a metric logged once per epoch
        stays in ``callback_metrics`` unchanged and must not count as a new value each time."""
        scalars = _scalars(trainer.callback_metrics)
        fresh = {key: v for key, v in scalars.items() if self._metrics_seen.get(key) != v}
        self._metrics_seen = scalars
        return fresh

    def _stop_if_asked(self, trainer: pl.Trainer, step: int) -> None:
        """Save a checkpoint and stop if any rank's alerts reached ``stop_on`` (a collective:
        every rank calls it at the same steps)."""
        if self.session.decide_stop() and not trainer.should_stop:
            trainer.save_checkpoint(
                os.path.join(_checkpoint_dir(trainer), f"spinal-stop-step={step}.ckpt")
            )
            trainer.should_stop = True

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

    def _writer(self, trainer: pl.Trainer) -> tuple[Any, str]:
        """The TensorBoardLogger's writer and directory, else our own SummaryWriter's."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment, logger.log_dir
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.log_dir or os.path.join(trainer.default_root_dir, "spinal")
        self._own_writer = SummaryWriter(log_dir)
        return self._own_writer, log_dir


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
