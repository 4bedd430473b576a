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

import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from spinal_callback.config import SpinalConfig
from spinal_callback.integrations.common import SpinalOptions, check_reference_argument
from spinal_callback.outputs.sinks import AlertHook
from spinal_callback.outputs.tensorboard import TraceBoard
from spinal_callback.training.recovery import TrainingState, sharded_engine_reason
from spinal_callback.training.state import saved_state
from spinal_callback.training.stop_ledger import Decision

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


def training_state(
    args: TrainingArguments, model: nn.Module, optimizer: Any, scheduler: Any
) -> TrainingState:
    """What a recovery restores in a HF ``Trainer``: the model's trainable parameters, the
    optimizer (accelerate's wrapper, whose ``scaler`` is the fp16 gradient scaler) and the
    scheduler.

    Raises:
        ValueError: DeepSpeed, FSDP or DTensor parameters (sharded state;
            ``sharded_engine_reason``), or no optimizer (``TrainingState.of``).
    """
    engines = [
        name
        for name, on in (
            ("DeepSpeed", getattr(args, "deepspeed", None)),
            ("DeepSpeed", os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"),
            ("FSDP", getattr(args, "fsdp", None)),
            ("FSDP", os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"),
        )
        if on
    ]
    reason = sharded_engine_reason(engines)
    if reason is not None:
        raise ValueError(reason)
    return TrainingState.of(model, [optimizer], [scheduler], [getattr(optimizer, "scaler", None)])


class SpinalTrainerCallback(SpinalOptions, TrainerCallback):
    """Probe late-layer depth traces during HF/TRL training; alert, and stop (or recover:
    ``on_critical="recover"``) on ``stop_on``.

    Args:
        config, probe_texts, log_dir, on_alert: as ``SpinalOptions`` (``log_dir`` ``None``:
            ``default_log_dir(args)``, ``<output_dir>/runs/spinal`` on transformers 5).
        ref_model: the reference model to trace once as the baseline (TRL's ``ref_model``);
            with a PEFT policy and no ``ref_model`` the adapters-disabled policy is used.
        **options: the other ``SpinalOptions``: ``neutral_texts``, ``every_n_steps``, ``stop_on``,
            ``late_layers``, ``event_log``, ``drift_every``, ``keep_good_checkpoint`` (a
            directory of ``save_pretrained`` weights; not under DeepSpeed ZeRO-3) and any other
            ``SpinalConfig`` field.

    TensorBoard gets every probe from the ``TraceBoard``. The summaries also go to the
    trainer's logs at each ``on_log``, for the callbacks listed after this one: call
    ``run_first(trainer, callback)`` for W&B and MLflow to get them.

    The callback's state is saved in every checkpoint (``trainer_state.json``) and restored onto
    this object on resume; a second ``train()`` (or another trainer) starts a new run.
    """

    def __init__(
        self,
        config: SpinalConfig | None = None,
        probe_texts: Sequence[str] | None = None,
        log_dir: str | None = None,
        on_alert: AlertHook | None = None,
        *,
        ref_model: nn.Module | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            config=config, probe_texts=probe_texts, log_dir=log_dir, on_alert=on_alert, **options
        )
        check_reference_argument(ref_model)
        self.ref_model = ref_model
        self._model: nn.Module | None = None

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
        log_dir = self.log_dir or default_log_dir(args)
        self._start_run([str(args.output_dir), log_dir])
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset = getattr(train_dataloader, "dataset", None)
        self.runner.setup(model, tokenizer, dataset, self.ref_model)
        self._model = model
        saved = saved_state(state.stateful_callbacks, STATE_KEY, type(self).__name__)
        if state.global_step > 0 and saved:
            self.runner.load_state_dict(saved)
        if self.config.on_critical == "recover":
            optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
            self.runner.watch_training(training_state(args, model, optimizer, scheduler))
        self._prepare_good(
            self._save_weights(state.is_world_process_zero), state.is_world_process_zero
        )
        board = TraceBoard.open(log_dir) if state.is_world_process_zero else None
        outputs = self._outputs(board, log_dir, owns_board=True)
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
            self._rotate_good(step)
        self._act(decision, control, state, store=step == self.runner.last_probe_step)

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

    def _act(
        self, decision: Decision, control: TrainerControl, state: TrainerState, store: bool = True
    ) -> None:
        """Keep the checkpointed state current (after a probe or a log, not at every step); on
        a stop (now or earlier), save a checkpoint and stop."""
        if store or decision.stop:
            self._store(state)
        if decision.stop or self.runner.stopped:
            control.should_save = True
            control.should_training_stop = True

    def _save_weights(self, main: bool) -> Callable[[str], None]:
        """The good checkpoint's save: the weights via ``save_pretrained`` (the main process
        writes)."""

        def save(path: str) -> None:
            if main and self._model is not None:
                self._model.save_pretrained(path)  # type: ignore[operator]

        return save

    def _store(self, state: TrainerState) -> None:
        """Our bounded state under ``STATE_KEY``, written with the next checkpoint."""
        if isinstance(state.stateful_callbacks, dict):
            state.stateful_callbacks[STATE_KEY] = self.runner.state_dict()
