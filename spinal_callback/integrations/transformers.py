"""SpinalTrainerCallback: the runner inside a Hugging Face ``Trainer`` or TRL ``DPOTrainer``.

    spinal = SpinalTrainerCallback(every_n_steps=50)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=train,
                         processing_class=tokenizer, callbacks=[spinal])

The adapter only translates HF's events into ``Runner`` calls (ARCHITECTURE.md).

Where the scalars go: ``TraceBoard`` charts the whole trace in ``<logging_dir>/spinal``, and
``on_log`` adds the summaries (``spinal/ramp/*``, ``spinal/neutral/*``, ``spinal/alert_level``) to
the trainer's logs for the callbacks after this one: W&B, MLflow and the console, once
``run_first`` has put it ahead of them. HF's ``TensorBoardCallback`` stays ahead of it, so the
summaries are never charted a second time as ``train/spinal/*`` in the trainer's own run.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from spinal_callback.config import SpinalConfig
from spinal_callback.integrations.common import (
    GoodCheckpoint,
    check_keep_good_checkpoint,
    check_reference_argument,
    fresh_runner,
    rank_event_log,
    resolve_config,
    rotate_good_checkpoint,
)
from spinal_callback.outputs import AlertHook, Outputs
from spinal_callback.runner import Decision, Runner
from spinal_callback.tensorboard import TraceBoard

logger = logging.getLogger("spinal_callback")
STATE_KEY = "spinal_callback"
"""Our entry in ``TrainerState.stateful_callbacks``; not the class name, so that HF's
``restore_callback_states_from_checkpoint`` never replaces the user's callback object."""


def default_log_dir(args: TrainingArguments) -> str:
    """``$TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers < 5), else
    ``<output_dir>/runs``; then ``/spinal``. Stable across resumes, unlike HF's timestamped dir."""
    base = os.getenv("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
    return os.path.join(base or os.path.join(str(args.output_dir), "runs"), "spinal")


def run_first(trainer: Any, callback: SpinalTrainerCallback) -> None:
    """Move ``callback`` ahead of ``trainer``'s other callbacks, so that the reporting
    integrations (W&B, MLflow, ...: HF lists them before user callbacks) also get the summaries
    it adds to the logs; but behind HF's ``TensorBoardCallback``, whose run would otherwise chart
    the summaries a second time (``train/spinal/*``) beside the ``TraceBoard``'s ``spinal/*``.

    Calling it again changes nothing.

    Raises:
        ValueError: ``callback`` is not among the trainer's callbacks.
    """
    handler = trainer.callback_handler
    if callback not in handler.callbacks:
        raise ValueError(
            "run_first: the callback is not one of this trainer's callbacks; pass it to the "
            "trainer (callbacks=[...]) or trainer.add_callback(callback) first"
        )
    others = [c for c in handler.callbacks if c is not callback]
    tensorboard = [c for c in others if isinstance(c, TensorBoardCallback)]
    rest = [c for c in others if not isinstance(c, TensorBoardCallback)]
    handler.callbacks[:] = [*tensorboard, callback, *rest]


class SpinalTrainerCallback(TrainerCallback):
    """Probe late-layer depth traces during HF/TRL training; alert, and stop on ``stop_on``.

    Args:
        config: a ``SpinalConfig`` (or a dict of its fields); the keywords below apply on top.
        probe_texts: probe texts; ``None`` takes the ``prompt`` column of the train dataset.
        log_dir: TensorBoard directory; ``None`` is ``default_log_dir(args)``
            (``<output_dir>/runs/spinal`` on transformers 5).
        on_alert: called with each ``Alert``; an exception it raises is logged, not propagated.
        neutral_texts: neutral text the run does not train on, probed in the same forward
            (``None``: ``texts.DEFAULT_NEUTRAL_TEXTS``, plain English).
        ref_model: the reference model to trace once as the baseline (TRL's ``ref_model``);
            with a PEFT policy and no ``ref_model`` the adapters-disabled policy is used.
        every_n_steps, stop_on, late_layers, event_log, drift_every: the ``SpinalConfig``
            fields users set most; a value equal to the field's default leaves ``config`` as is.
        keep_good_checkpoint: a directory that always holds the model's weights
            (``save_pretrained``) from a probe that a later quiet probe vouched for, while no rank
            has warned; at most two copies on disk (``GoodCheckpoint``), whatever
            ``save_total_limit`` deletes. Weights only (no optimizer state); not under DeepSpeed
            ZeRO-3, whose weights are partitioned. ``None``: off.
        **config_overrides: any other ``SpinalConfig`` field.

    TensorBoard gets every probe from the ``TraceBoard`` (``log_dir``). The summaries also go
    to the trainer's logs at each ``on_log`` (the latest probe's, once), for the callbacks listed
    after this one: call ``run_first(trainer, callback)`` for W&B and MLflow to get them; it
    keeps HF's ``TensorBoardCallback`` ahead, so no summary is charted twice.

    Bad configuration raises at construction or at ``on_train_begin``, before the first step.
    The callback's state is saved in every checkpoint (``trainer_state.json``) and restored onto
    this object on resume.
    """

    def __init__(
        self,
        config: SpinalConfig | dict[str, Any] | None = None,
        probe_texts: Sequence[str] | None = None,
        log_dir: str | None = None,
        on_alert: AlertHook | None = None,
        neutral_texts: Sequence[str] | None = None,
        ref_model: nn.Module | None = None,
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
        self.log_dir = log_dir
        check_reference_argument(ref_model)
        self.ref_model = ref_model
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
        self._model: nn.Module | None = None
        self._good: GoodCheckpoint | None = None

    @property
    def traces(self) -> list[Any]:
        """The ``DepthTrace``s of the current probe (restored ones included after a resume)."""
        return self.runner.traces

    @property
    def alerts(self) -> list[Any]:
        """The ``Alert``s raised in this process."""
        return self.runner.alerts

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
        if self.runner.begun:
            self.runner = fresh_runner(self.runner, self._new_runner)
            self._good = None
        log_dir = self.log_dir or default_log_dir(args)
        check_keep_good_checkpoint(
            self.keep_good_checkpoint, [str(args.output_dir), log_dir, self.config.event_log]
        )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset = getattr(train_dataloader, "dataset", None)
        self.runner.setup(model, tokenizer, dataset, self.ref_model)
        self._model = model
        if state.global_step > 0:
            self._restore(state)
        board = TraceBoard.open(log_dir) if state.is_world_process_zero else None
        outputs = Outputs(board, rank_event_log(self.config, log_dir), owns_board=True)
        self._act(self.runner.begin(state.global_step, outputs, log_dir), control, state)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A stop decided at train begin: HF takes one step before it looks at the control, so
        clear the gradients and let that step change nothing."""
        model = kwargs.get("model")
        if self.runner.stopped and model is not None:
            model.zero_grad(set_to_none=True)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        decision = self.runner.step(step)
        if decision.save_good:
            self._save_good(step, state)
        if step == self.runner.last_probe_step:
            self._store(state)
        if decision.stop or self.runner.stopped:
            control.should_save = True
            control.should_training_stop = True

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
        decision = self.runner.logs(state.global_step, logs)
        logs.update(self.runner.pop_scalars())
        self._act(decision, control, state)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        path = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.runner.saved(state.global_step, path)
        self._store(state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.runner.end(state.global_step)

    def _act(self, decision: Decision, control: TrainerControl, state: TrainerState) -> None:
        """Keep the checkpointed state current; on a stop, save a checkpoint and stop."""
        self._store(state)
        if decision.stop:
            control.should_save = True
            control.should_training_stop = True

    def _save_good(self, step: int, state: TrainerState) -> None:
        """Rotate the good checkpoint (``GoodCheckpoint``): weights via ``save_pretrained``."""
        model = self._model
        if self.keep_good_checkpoint is None or model is None:
            return
        if self._good is None:
            main = state.is_world_process_zero

            def save(path: str) -> None:
                if main:
                    model.save_pretrained(path)  # type: ignore[operator]

            self._good = GoodCheckpoint(self.keep_good_checkpoint, save, main, self.runner.run_id)
        promoted = rotate_good_checkpoint(self._good, step)
        if promoted is not None:
            self.runner.saved(promoted, self.keep_good_checkpoint)

    def _store(self, state: TrainerState) -> None:
        """Our bounded state under ``STATE_KEY``, written with the next checkpoint."""
        if isinstance(state.stateful_callbacks, dict):
            state.stateful_callbacks[STATE_KEY] = self.runner.state_dict()

    def _restore(self, state: TrainerState) -> None:
        """On resume, load the state saved in the checkpoint's ``trainer_state.json`` (also the
        entry older versions saved under the class name)."""
        stored: dict[str, Any] = dict(state.stateful_callbacks or {})  # type: ignore[arg-type]
        saved = stored.get(STATE_KEY)
        if saved is None:
            legacy = stored.get(type(self).__name__)
            if isinstance(legacy, list):
                legacy = legacy[0] if legacy else None
            saved = (legacy or {}).get("attributes", {}).get("spinal_state")
        if saved:
            self.runner.load_state_dict(saved)
