"""SpinalTrainerCallback: the probe inside a Hugging Face ``Trainer`` or TRL ``DPOTrainer``.

    spinal = SpinalTrainerCallback(every_n_steps=50)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=train,
                         processing_class=tokenizer, callbacks=[spinal])

The adapter only decides when to probe (train begin, every ``every_n_steps``, train end) and
where to write (``<output_dir>/runs/spinal`` on the main process); ``ProbeSession`` does the rest.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ExportableState

from spinal_callback.config import SpinalConfig
from spinal_callback.session import AlertHook, ProbeSession
from spinal_callback.tensorboard import TraceBoard


def default_log_dir(args: TrainingArguments) -> str:
    """``$TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers < 5), else
    ``<output_dir>/runs``; then ``/spinal``. Stable across resumes, unlike HF's timestamped dir."""
    base = os.getenv("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
    return os.path.join(base or os.path.join(str(args.output_dir), "runs"), "spinal")


class SpinalTrainerCallback(TrainerCallback, ExportableState):
    """Probe late-layer depth traces during HF/TRL training and write them to TensorBoard.

    Args:
        config: a ``SpinalConfig`` (or a dict of its fields); keyword overrides apply on top.
        probe_texts: probe texts; ``None`` takes the ``prompt`` column of the train dataset.
        log_dir: TensorBoard directory; ``None`` is ``default_log_dir(args)``
            (``<output_dir>/runs/spinal`` on transformers 5).
        on_alert: called with each ``Alert``.
        neutral_texts: neutral text the run does not train on, probed in the same forward
            (``None``: ``texts.DEFAULT_NEUTRAL_TEXTS``, plain English).
        ref_model: the reference model to trace once as the baseline (TRL's ``ref_model``);
            with a PEFT policy and no ``ref_model`` the adapters-disabled policy is used.
        **config_overrides: ``SpinalConfig`` fields, e.g. ``every_n_steps=50``.

    Bad configuration raises ``ValueError`` at construction or at ``on_train_begin``, before the
    first training step. A probe that fails during training is logged as an alert and retried
    once with half the batch; after a second failure probing stops and training goes on.
    """

    def __init__(
        self,
        config: SpinalConfig | dict[str, Any] | None = None,
        probe_texts: Sequence[str] | None = None,
        log_dir: str | None = None,
        on_alert: AlertHook | None = None,
        neutral_texts: Sequence[str] | None = None,
        ref_model: nn.Module | None = None,
        **config_overrides: Any,
    ) -> None:
        base = config if isinstance(config, SpinalConfig) else SpinalConfig(**(config or {}))
        self.config = base.with_overrides(**config_overrides)
        self.probe_texts = list(probe_texts) if probe_texts is not None else None
        self.log_dir = log_dir
        self.ref_model = ref_model
        self.neutral_texts = list(neutral_texts) if neutral_texts is not None else None
        self.session = ProbeSession(self.config, self.probe_texts, on_alert, self.neutral_texts)
        self._writer: Any = None

    @property
    def traces(self) -> list[Any]:
        """The ``DepthTrace``s recorded so far (restored ones included after a resume)."""
        return self.session.history

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        processing_class: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("SpinalTrainerCallback got no model from the trainer")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset = getattr(train_dataloader, "dataset", None)
        self.session.setup(model, tokenizer, dataset, self.ref_model)
        self._restore_from(state)
        log_dir = self.log_dir or default_log_dir(args)
        board = None
        if state.is_world_process_zero:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir)
            board = TraceBoard(self._writer)
        self.session.attach_outputs(board, log_dir, state.global_step)
        self._run_before_reporting_callbacks()
        if state.global_step == 0:
            self._probe(model, 0, control)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is not None and self.session.is_due(state.global_step):
            self._probe(model, state.global_step, control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        self.session.observe_logs(state.global_step, logs)
        logs.update(self.session.pop_pending_logs())
        self._stop_if_asked(control)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        session = self.session
        if (
            model is not None
            and not session.disabled
            and session.last_probe_step != state.global_step
        ):
            session.probe_at(model, state.global_step)
        session.finish()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _probe(self, model: nn.Module, step: int, control: TrainerControl) -> None:
        """Probe, then stop (saving a checkpoint first) if any rank's alerts reached stop_on."""
        self.session.probe_at(model, step)
        self._stop_if_asked(control)

    def _stop_if_asked(self, control: TrainerControl) -> None:
        """Save a checkpoint and stop if any rank's alerts reached ``stop_on`` (a collective)."""
        if self.session.decide_stop():
            control.should_save = True
            control.should_training_stop = True

    def state(self) -> dict[str, Any]:
        """Saved with every checkpoint (``trainer_state.json``): constructor args and history."""
        return {
            "args": {
                "config": self.config.to_dict(),
                "probe_texts": self.probe_texts,
                "neutral_texts": self.neutral_texts,
                "log_dir": self.log_dir,
            },
            "attributes": {"spinal_state": self.session.state_dict()},
        }

    @property
    def spinal_state(self) -> dict[str, Any]:
        return self.session.state_dict()

    @spinal_state.setter
    def spinal_state(self, value: dict[str, Any]) -> None:
        # HF sets this when `restore_callback_states_from_checkpoint=True` rebuilds the callback.
        self.session.load_state_dict(value)

    def _restore_from(self, state: TrainerState) -> None:
        """On resume, load the history saved in the checkpoint's ``trainer_state.json``."""
        if state.global_step == 0 or self.session.last_probe_step >= 0:
            return
        stored: dict[str, Any] = dict(state.stateful_callbacks or {})  # type: ignore[arg-type]
        saved = stored.get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if saved:
            self.session.load_state_dict(saved["attributes"]["spinal_state"])

    def _run_before_reporting_callbacks(self) -> None:
        """Move this callback to the front so W&B/MLflow/... see the scalars it adds in on_log.

        HF lists reporting integrations before user callbacks, and every callback receives the
        same ``logs`` dict in turn; the handler is the caller of this callback's hooks.
        """
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        handler = caller.f_locals.get("self") if caller is not None else None
        if isinstance(handler, CallbackHandler) and self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
