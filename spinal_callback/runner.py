"""Runner: the probe inside a training loop, with no framework in sight.

An adapter translates its framework's events into four calls, on every rank at the same points:

    runner.setup(model, tokenizer, dataset, reference_model)   # build; bad input raises here
    runner.begin(step, outputs, directory)    -> Decision       # train start (step > 0: resume)
    runner.step(step)                         -> Decision       # after each optimizer step
    runner.logs(step, logs)                   -> Decision       # the trainer's logged scalars
    runner.saved(step, path)                                     # a checkpoint was written
    runner.end(step)                                             # train end

and acts on the ``Decision``: when ``stop`` is true, save a checkpoint and stop. The stop decision
is the only collective (an injected ``reduce_any``: Lightning's strategy, else
``torch.distributed``), taken only when ``stop_on`` is set. See ARCHITECTURE.md for how the
parts fit together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback import distributed
from spinal_callback.config import SpinalConfig
from spinal_callback.detector import RampMonitor
from spinal_callback.drift import DriftMeter, drift_scalars
from spinal_callback.events import RESUMED, Alert, AlertLevel
from spinal_callback.history import TraceHistory, runs_in
from spinal_callback.lens_check import same_logit_scale
from spinal_callback.model_access import check_reference_model, peft_model_in
from spinal_callback.outputs import AlertHook, Outputs
from spinal_callback.ownership import RunLock, lock_or_warn, new_run_id
from spinal_callback.probe import ProbeBatch, SpinalProbe
from spinal_callback.rules.language import has_language
from spinal_callback.sharding import sharding_root
from spinal_callback.tensorboard import summary_scalars
from spinal_callback.texts import DEFAULT_NEUTRAL_TEXTS, check_texts
from spinal_callback.trace import DepthTrace

logger = logging.getLogger("spinal_callback")
STATE_VERSION = 3
PROBE_FAILED = "probe_failed"
TRAINING_STOPPED = "training_stopped"
TOOL_RULES = frozenset({PROBE_FAILED})
"""Rules that report a failure of this tool, not of the run: they never stop training."""
CHECKPOINTS_KEPT = 8
"""Checkpoints remembered (step, path) to name the last one saved before the first warning."""
ReduceAny = Callable[[bool], bool]


@dataclass(frozen=True)
class Decision:
    """What the adapter does after an event.

    Attributes:
        stop: save a checkpoint, then stop training.
        message: why (names the checkpoint to resume from).
        save_good: overwrite the one good checkpoint (``keep_good_checkpoint``): every rank has
            probed and none has warned so far.
    """

    stop: bool = False
    message: str = ""
    save_good: bool = False


CONTINUE = Decision()


def build_probe_batch(
    config: SpinalConfig,
    tokenizer: Any,
    probe_texts: Sequence[str] | None,
    dataset: Any = None,
) -> ProbeBatch:
    """The probe from explicit texts, else from the prompts of ``dataset``.

    Raises:
        ValueError: no tokenizer, or neither texts nor a dataset with a ``prompt`` column.
    """
    if tokenizer is None:
        raise ValueError(
            "spinal-callback needs a tokenizer to build the probe: pass tokenizer=... to the "
            "callback (Lightning) or processing_class=... to the trainer (HF/TRL)"
        )
    if probe_texts is not None:
        return ProbeBatch.from_texts(tokenizer, list(probe_texts), config.max_probe_length)
    if dataset is None:
        raise ValueError(
            "spinal-callback has no probe texts and no train dataset to take prompts from: "
            "pass probe_texts=[...] to the callback"
        )
    return ProbeBatch.from_dataset(tokenizer, dataset, max_length=config.max_probe_length)


class Runner:
    """Schedule, reference, history, drift, rules, outputs and the stop decision of one run.

    Args:
        config: the run's ``SpinalConfig``.
        probe_texts: probe texts; ``None`` takes prompts from the train dataset at ``setup``.
            Checked here (``texts.check_texts``): a bare string, an empty list or blank texts
            raise at construction.
        neutral_texts: neutral texts (``None``: ``texts.DEFAULT_NEUTRAL_TEXTS``).
        on_alert: called with every ``Alert`` (on every rank); an exception it raises is logged,
            never propagated.
        reduce_any: the stop collective, ``True`` on every rank if ``True`` on any
            (``distributed.any_rank`` unless ``begin`` gets another).
        keep_good_checkpoint: ask (``Decision.save_good``) for a checkpoint at every probe
            while no rank has warned, so one checkpoint from before the trouble always exists.
    """

    def __init__(
        self,
        config: SpinalConfig,
        probe_texts: Sequence[str] | None = None,
        neutral_texts: Sequence[str] | None = None,
        on_alert: AlertHook | None = None,
        reduce_any: ReduceAny = distributed.any_rank,
        keep_good_checkpoint: bool = False,
    ) -> None:
        self.config = config
        self.run_id = new_run_id()
        """This run's identity: in every event-log record and trace line, and in checkpoints
        (a resume keeps it)."""
        self.keep_good_checkpoint = keep_good_checkpoint
        self._trouble_anywhere = False
        self.probe_texts = None if probe_texts is None else check_texts(probe_texts, "probe_texts")
        self.neutral_texts = (
            None if neutral_texts is None else check_texts(neutral_texts, "neutral_texts")
        )
        if on_alert is not None and not callable(on_alert):
            raise TypeError(
                f"on_alert must be a callable taking an Alert, got {on_alert!r} "
                f"({type(on_alert).__name__}); to post alerts to a URL, pass a function that "
                "posts alert.to_dict()"
            )
        self.on_alert = on_alert
        self.reduce_any = reduce_any
        self.probe: SpinalProbe | None = None
        self.reference_probe: SpinalProbe | None = None
        self.outputs = Outputs(on_alert=on_alert)
        self.history = TraceHistory(run_id=self.run_id)
        self.reference: DepthTrace | None = None
        self.monitor = RampMonitor(config)
        self.drift: DriftMeter | None = None
        self._drift_state: dict[str, Any] | None = None
        self.alerts: list[Alert] = []
        self.pending: dict[str, float] = {}
        self.last_probe_step = -1
        self.probes_run = 0
        self.disabled = False
        self.stop_requested: Alert | None = None
        self.stopped = False
        self.stop_checkpoint: tuple[int, str] | None = None
        """(step, path) of the checkpoint saved for the stop, once the adapter reports it."""
        self.first_warning_step: int | None = None
        self.checkpoints: list[tuple[int, str]] = []
        self.worst_level = 0
        """The highest alert level charted so far (``spinal/alert_level_max``)."""
        self.begun = False
        """``begin`` has run: this runner belongs to one training run from then on."""
        self._locks: list[RunLock] = []
        self._previous_files: dict[str, str] = {}
        """The restored checkpoint's log dir and event log, named in the ``resumed`` record when
        the run goes on elsewhere (a versioned logger's next version)."""

    @property
    def traces(self) -> list[DepthTrace]:
        """The traces of the current probe, restored ones included after a resume."""
        return self.history.traces

    # ---- events ------------------------------------------------------------------------------

    def setup(
        self,
        model: nn.Module,
        tokenizer: Any,
        dataset: Any = None,
        reference_model: nn.Module | None = None,
    ) -> None:
        """Build the probe (and the reference probe); raise on any bad input (a reference
        model of another architecture or size: ``model_access.check_reference_model``)."""
        batch = build_probe_batch(self.config, tokenizer, self.probe_texts, dataset)
        neutral = None
        if self.config.neutral_probe:
            texts = self.neutral_texts or list(DEFAULT_NEUTRAL_TEXTS)
            neutral = ProbeBatch.from_texts(tokenizer, texts, self.config.max_probe_length)
        if reference_model is not None:
            check_reference_model(
                model,
                reference_model,
                blocks_path=self.config.blocks_path,
                final_norm_path=self.config.final_norm_path,
                head_path=self.config.head_path,
            )
        self.probe = SpinalProbe(model, batch, self.config, neutral)
        if reference_model is not None:
            self.reference_probe = SpinalProbe(
                reference_model, batch, self.config, neutral, self.probe.lens_tokens
            )
        if self.config.drift_every is not None:
            self.drift = DriftMeter(batch, self.config.seed + 2, self.config.autocast_dtype)
            self.drift.load_state_dict(self._drift_state)
        self._adopt_reference_lens_tokens()

    def begin(
        self,
        step: int,
        outputs: Outputs,
        directory: str | Path | None = None,
        reduce_any: ReduceAny | None = None,
    ) -> Decision:
        """Train start: lock this run's files, attach the sinks (the runner's ``on_alert``
        becomes their hook), mark what a resume from ``step`` supersedes, and probe at step 0.

        ``directory`` holds the trace history and the drift reference (one file per rank).

        Raises:
            RunConflictError: another live process writes to ``directory`` or to the event log.
        """
        self._require_setup()
        self.begun = True
        outputs.on_alert = self.on_alert
        outputs.run_id = self.run_id
        self.outputs = outputs
        if reduce_any is not None:
            self.reduce_any = reduce_any
        self._lock(outputs, directory)
        if directory is not None:
            self._open_files(Path(directory), step)
        if step > 0:
            self._mark_resume(step, directory)
        if outputs.board is not None and self.drift is not None:
            outputs.board.chart_drift()
        if step == 0 and self.last_probe_step < 0:
            self._probe(0)
            return self._decide(0)
        return CONTINUE

    def _lock(self, outputs: Outputs, directory: str | Path | None) -> None:
        """Lock the log dir and the event log for this run (``ownership.RunLock``)."""
        suffix = _rank_suffix()
        paths = [] if directory is None else [Path(directory) / f".spinal{suffix}.lock"]
        if outputs.event_log is not None:
            log = outputs.event_log.path
            paths.append(log.with_name(f".{log.name}.lock"))
        for path in paths:
            lock = lock_or_warn(path, self.run_id)
            if lock is not None:
                self._locks.append(lock)
        if self._locks:
            logger.info(
                "spinal-callback: run %s writes %s; a second run writing there is refused "
                "until this one ends",
                self.run_id,
                " and ".join(sorted({str(lock.path.parent) for lock in self._locks})),
            )

    def _open_files(self, directory: Path, step: int) -> None:
        """The trace history and the drift reference in this run's own ``directory`` (never a
        path a checkpoint names); at a fresh start, say so when other runs wrote there."""
        suffix = _rank_suffix()
        traces = directory / f"spinal_traces{suffix}.jsonl"
        others = sorted(runs_in(traces) - {self.run_id}) if step == 0 else []
        if others:
            self.outputs.note(
                step,
                f"{directory} already holds the traces of another run ({', '.join(others)}); "
                f"this run ({self.run_id}) appends after them and its event-log records carry "
                "its run id, but TensorBoard will chart both runs in the same place: give each "
                "run its own log_dir",
            )
        self.history.open(traces)
        if self.drift is not None:
            self.drift.attach(
                directory / f"spinal_drift_reference.{self.run_id}{suffix}.safetensors"
            )

    def _mark_resume(self, step: int, directory: str | Path | None) -> None:
        """A ``resumed`` record that supersedes this run's records after ``step`` (the event
        log keeps them), hidden TensorBoard events after ``step``, and the charted alert level
        restored. A checkpoint written in another folder (a versioned logger's previous
        version, or the run a folder was copied from) is named, never written to."""
        record = _resumed_record(step, self.outputs.records_after(step))
        previous = self._previous_files.get("directory")
        moved = previous is not None and directory is not None
        if moved and Path(str(previous)).resolve() != Path(str(directory)).resolve():
            record = dataclasses.replace(
                record,
                message=f"{record.message}. The checkpoint was written in {previous}: this "
                f"folder takes the run on from step {step}, and what that folder holds after "
                "it is superseded (it is left as it is)",
            )
        self.outputs.record(record)
        self.outputs.hide_after(step)
        if self.outputs.board is not None:
            self.outputs.board.restore_worst_level(self.worst_level)

    def step(self, step: int) -> Decision:
        """After an optimizer step: probe when due (every ``every_n_steps``), then decide."""
        if step == self.last_probe_step or step % self.config.every_n_steps != 0:
            return CONTINUE
        self._probe(step)
        decision = self._decide(step)
        if decision.stop or not self.keep_good_checkpoint or self._trouble_anywhere:
            return decision
        trouble = self.first_warning_step is not None or self.disabled
        self._trouble_anywhere = self.reduce_any(trouble)
        return CONTINUE if self._trouble_anywhere else Decision(save_good=True)

    def logs(self, step: int, logs: Mapping[str, Any]) -> Decision:
        """The trainer's logged scalars (loss, DPO rewards): score them, then decide."""
        alerts = self.monitor.update_logs(step, logs)
        self.worst_level = max([self.worst_level, *(int(a.severity) for a in alerts)])
        self.outputs.level(step, alerts)
        if alerts:
            # Forwarded with the next logs, like a probe's level (the highest one wins).
            level = float(max(alert.severity for alert in alerts))
            self.pending["spinal/alert_level"] = max(
                level, self.pending.get("spinal/alert_level", 0.0)
            )
        for alert in alerts:
            self._raise(alert)
        if alerts:
            self.outputs.flush()
        return self._decide(step)

    def saved(self, step: int, path: str) -> None:
        """A checkpoint of the run was written at ``step`` to ``path``."""
        if self.stopped and self.stop_checkpoint is None:
            self._report_stop_checkpoint(int(step), str(path))
        self.checkpoints = [c for c in self.checkpoints if c[1] != path]
        self.checkpoints = [*self.checkpoints, (int(step), str(path))][-CHECKPOINTS_KEPT:]

    def end(self, step: int) -> None:
        """Train end: a last probe if this step has none (and the run was not stopped: the
        stop's own step is the last that matters), the final heatmap, close the sinks. No stop
        decision: training is over."""
        if step != self.last_probe_step and not self.stopped:
            self._probe(step)
        if self.history.traces:
            self.outputs.heatmap(self.history.traces, self.reference, self.alerts)
        self._log_summary(step)
        self.outputs.close()
        self.release()

    def release(self) -> None:
        """Unlock this run's files (``end`` does it; a run that died keeps them locked only
        until its process exits)."""
        for lock in self._locks:
            lock.release()
        self._locks = []

    def pop_scalars(self) -> dict[str, float]:
        """Scalars of the probes not yet handed to the trainer's loggers."""
        scalars, self.pending = self.pending, {}
        return scalars

    def last_good_checkpoint(self) -> tuple[int, str] | None:
        """The last checkpoint saved before the first warning (any checkpoint if none)."""
        limit = self.first_warning_step
        good = [c for c in self.checkpoints if limit is None or c[0] < limit]
        return good[-1] if good else None

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable and bounded: schedule position, reference, rules, history file,
        drift reference file, checkpoints seen."""
        return {
            "version": STATE_VERSION,
            "run": self.run_id,
            "directory": None if self.history.path is None else str(self.history.path.parent),
            "event_log": None
            if self.outputs.event_log is None
            else str(self.outputs.event_log.path),
            "worst_level": self.worst_level,
            "last_probe_step": self.last_probe_step,
            "probes_run": self.probes_run,
            "disabled": self.disabled,
            "history": self.history.state_dict(),
            "reference": self.reference.to_dict() if self.reference is not None else None,
            "monitor": self.monitor.state_dict(),
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "first_warning_step": self.first_warning_step,
            "checkpoints": [list(c) for c in self.checkpoints],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (version 1 states, from before the trace history
        moved to a file, load too)."""
        version = int(state.get("version", 0))
        if version > STATE_VERSION:
            raise ValueError(
                f"spinal-callback state version {version} is newer than {STATE_VERSION}; "
                "upgrade spinal-callback to resume this checkpoint"
            )
        self.run_id = str(state.get("run") or self.run_id)
        self.history.run_id = self.run_id
        self.worst_level = int(state.get("worst_level", 0))
        self._previous_files = {
            key: str(state[key]) for key in ("directory", "event_log") if state.get(key)
        }
        self.last_probe_step = int(state["last_probe_step"])
        self.disabled = bool(state["disabled"])
        self.history.load_state_dict(state["history"])
        self.probes_run = int(state.get("probes_run", len(self.history)))
        reference = state.get("reference")
        self.reference = DepthTrace.from_dict(reference) if reference else None
        self.monitor = RampMonitor(self.config)
        if self.reference is not None:
            self.monitor.set_reference(self.reference)
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
        self._drift_state = state.get("drift", state.get("drift_reference"))
        if self.drift is not None:
            self.drift.load_state_dict(self._drift_state)
        first = state.get("first_warning_step")
        self.first_warning_step = None if first is None else int(first)
        self.checkpoints = [(int(s), str(p)) for s, p in state.get("checkpoints", [])]
        self._adopt_reference_lens_tokens()

    def _adopt_reference_lens_tokens(self) -> None:
        """After a resume, the probe's lens takes as many tokens as the restored reference's did
        (the counts in its traces' metadata) instead of settling anew on the trained model, so
        the baseline stays token for token; only for the same probe (fingerprint)."""
        probe, reference = self.probe, self.reference
        if probe is None or reference is None or probe.lens_tokens:
            return
        if reference.probe_fingerprint != probe.probe_fingerprint:
            return
        traces = [reference] if reference.neutral is None else [reference, reference.neutral]
        counts = [trace.metadata.get("transport_tokens") for trace in traces]
        known = [count for count in counts if isinstance(count, int) and count > 0]
        if len(known) == len(probe.groups):
            probe.lens_tokens.update(enumerate(known))

    # ---- internals ---------------------------------------------------------------------------

    def _require_setup(self) -> SpinalProbe:
        if self.probe is None:
            raise RuntimeError("Runner.setup() must run before the training events")
        return self.probe

    def _probe(self, step: int) -> None:
        """Probe (every rank), score against the reference, record and write."""
        self.last_probe_step = step
        drift_every = self.config.drift_every
        drift_due = drift_every is not None and self.probes_run % drift_every == 0
        self.probes_run += 1
        trace = None if self._probing_off() else self._run_safely(step)
        if trace is None:
            return
        self._baseline_for(trace, step)
        self.history.append(trace)
        alerts = self.monitor.update(trace)
        self.worst_level = max([self.worst_level, *(int(a.severity) for a in alerts)])
        self.pending.update(summary_scalars(trace, self.reference))
        self.pending["spinal/alert_level"] = float(max((a.severity for a in alerts), default=0))
        if drift_due:
            self._record_drift(step)
        self.outputs.trace(trace, self.reference, alerts)
        for alert in alerts:
            self._raise(alert)
        if len(self.history) % self.config.image_every == 0:
            self.outputs.heatmap(self.history.traces, self.reference, self.alerts)
        self.outputs.flush()

    def _baseline_for(self, trace: DepthTrace, step: int) -> None:
        """Trace the reference at the first probe; restart the baseline when the probe changed
        (a halved batch after running out of memory, or other texts or layers on resume)."""
        change = None if self.reference is None else _probe_change(self.reference, trace)
        if change is not None:
            self.outputs.note(
                step,
                f"the probe changed at step {step} ({change}); the reference is traced again, "
                "the rules restart and earlier traces leave the heatmap",
            )
            self.reference = None
            self.monitor = RampMonitor(self.config)
            self.history.restart()
        if self.reference is None:
            self.reference = self._reference_trace(step) or trace
            self.monitor.set_reference(self.reference)
            note = muted_neutral_rules_note(self.reference)
            if note is not None:
                self.outputs.note(step, note)

    def _raise(self, alert: Alert) -> None:
        """Record; note the first warning and a stop request; hand to the sinks."""
        self.alerts.append(alert)
        if alert.rule not in TOOL_RULES:
            if alert.severity >= AlertLevel.WARNING and self.first_warning_step is None:
                self.first_warning_step = alert.step
            stop_on = self.config.stop_on
            if (
                stop_on is not None
                and self.stop_requested is None
                and alert.severity >= AlertLevel.parse(stop_on)
            ):
                self.stop_requested = alert
        self.outputs.alert(alert)

    def _decide(self, step: int) -> Decision:
        """The stop collective (every rank, same events), only when ``stop_on`` is set."""
        if self.config.stop_on is None or self.stopped:
            return CONTINUE
        if not self.reduce_any(self.stop_requested is not None):
            return CONTINUE
        self.stopped = True
        message = self._stop_message(step)
        self._announce_stop(step, "spinal/stop", message)
        return Decision(stop=True, message=message)

    def _stop_message(self, step: int) -> str:
        cause = self.stop_requested
        why = (
            f"{cause.level} {cause.rule} at step {cause.step}: {cause.message}"
            if cause is not None
            else "another rank's alert"
        )
        return (
            f"training stopped at step {step} by {why}. A checkpoint is saved now; it holds the "
            f"weights the alert saw. {self._resume_advice()}"
        )

    def _resume_advice(self) -> str:
        """Which checkpoint to resume from: the last one saved before the first warning."""
        good = self.last_good_checkpoint()
        if good is not None:
            where = f"Resume from {good[1]} (step {good[0]}), the last checkpoint saved before "
            return where + (
                f"the first warning (step {self.first_warning_step})."
                if self.first_warning_step is not None
                else "the stop."
            )
        if self.first_warning_step is not None:
            return (
                f"No checkpoint was saved before the first warning (step "
                f"{self.first_warning_step}); save more often (or set stop_on='warning')."
            )
        return "No checkpoint was saved before the stop."

    def _report_stop_checkpoint(self, step: int, path: str) -> None:
        """Where the stop's checkpoint went, in the event log, the text tab and the console."""
        self.stop_checkpoint = (step, path)
        message = (
            f"the stop's checkpoint is {path} (step {step}); it holds the weights the alert "
            f"saw. {self._resume_advice()}"
        )
        self._announce_stop(step, "spinal/stop_checkpoint", message)

    def _announce_stop(self, step: int, metric: str, message: str) -> None:
        """A ``training_stopped`` record (event log, text tab) at the cause's level, and the
        console at ERROR."""
        cause = self.stop_requested
        self.outputs.record(
            Alert(
                step=step,
                level=cause.level if cause is not None else "critical",
                rule=TRAINING_STOPPED,
                metric=metric,
                value=float("nan"),
                threshold=float("nan"),
                message=message,
            )
        )
        logger.error("spinal-callback: %s", message)
        self.outputs.flush()

    def _log_summary(self, step: int) -> None:
        """One console line at train end: the alerts by level and, after a stop, where to go on."""
        counts = {level: 0 for level in ("critical", "warning", "info")}
        for alert in self.alerts:
            counts[alert.level] = counts.get(alert.level, 0) + 1
        text = (
            f"{len(self.history.traces)} probes up to step {step}, {len(self.alerts)} alerts ("
            + ", ".join(f"{count} {level}" for level, count in counts.items())
            + ")"
        )
        if not self.stopped:
            (logger.warning if self.alerts else logger.info)("spinal-callback: %s", text)
            return
        cause = self.stop_requested
        text += f"; training stopped by {cause.level} {cause.rule}" if cause is not None else ""
        if self.stop_checkpoint is not None:
            text += f"; the stop's checkpoint: {self.stop_checkpoint[1]}"
        logger.error("spinal-callback: %s. %s", text, self._resume_advice())

    def _reference_trace(self, step: int) -> DepthTrace | None:
        """The reference traced once: TRL's ``ref_model``, else the PEFT model with adapters off."""
        probe = self._require_setup()
        with _failures_logged("reference probe", "the first trace is the baseline"):
            if self.reference_probe is not None:
                return self.reference_probe.run(step)
            peft_model = peft_model_in(probe.model)
            if peft_model is not None:
                with peft_model.disable_adapter():  # type: ignore[operator]
                    return probe.run(step)
        return None

    def _record_drift(self, step: int) -> None:
        """Measure every block's drift; hand it to the loggers and write it."""
        probe, drift = self._require_setup(), self.drift
        assert drift is not None
        with _failures_logged("drift measurement", "this probe has no drift"):
            measured = drift.measure(probe.parts, self._reference_outputs)
            scalars = drift_scalars(measured)
            self.pending.update(scalars)
            self.outputs.scalars(step, scalars)

    def _reference_outputs(self) -> Tensor | None:
        """The reference's block outputs for the drift: TRL's ``ref_model``, else the PEFT
        policy with adapters off, else ``None`` (the policy is its own snapshot)."""
        probe, drift = self._require_setup(), self.drift
        assert drift is not None
        if self.reference_probe is not None:
            return drift.outputs_of(self.reference_probe.parts)
        peft_model = peft_model_in(probe.model)
        if peft_model is None:
            return None
        with peft_model.disable_adapter():  # type: ignore[operator]
            return drift.outputs_of(probe.parts)

    def _probing_off(self) -> bool:
        """Whether this probe is skipped. A sharded model's probe all-gathers (``sharding``,
        DeepSpeed ZeRO-3):
        every rank probes or none does, so the ranks agree, and a rank that switched probing
        off switches it off everywhere."""
        if self._sharded():
            self.disabled = self.reduce_any(self.disabled)
        return self.disabled

    def _sharded(self) -> bool:
        """Whether the probe's forward runs collectives: FSDP or ``fully_shard`` gathers, or
        DeepSpeed ZeRO-3's partitioned parameters."""
        probe = self.probe
        if probe is None:
            return False
        return sharding_root(probe.model) is not None or probe.parts.zero3_partitioned

    def _run_safely(self, step: int) -> DepthTrace | None:
        """Run the probe. Out of memory: retry once with half the batch. Any other error, or a
        second failure: log it with its traceback and stop probing; training goes on.

        Sharded, the ranks retry together and give up together (one failing rank is enough),
        so that every rank's next probe collectives are the others' too."""
        probe = self._require_setup()
        trace, error = self._attempt(probe, step)
        out_of_memory = error is not None and is_out_of_memory(error)
        if self._sharded():
            out_of_memory = self.reduce_any(out_of_memory)
            if not out_of_memory and self.reduce_any(error is not None):
                self._give_up(step, error or _failed_elsewhere(), "")
                return None
        if not out_of_memory:
            if error is not None:
                self._give_up(step, error, "")
            return trace
        self._raise(
            _probe_alert(
                step,
                f"the probe ran out of memory ({error or _failed_elsewhere()!r}); retrying with "
                "half the batch",
            )
        )
        try:
            halved = _halved(probe)
        except ValueError as halving_error:
            halved, trace, error = None, None, halving_error
        if halved is not None:
            trace, error = self._attempt(halved, step)
        if self._sharded() and self.reduce_any(error is not None):
            error = error or _failed_elsewhere()
        if error is not None:
            self._give_up(step, error, " again, with half the batch")
            return None
        assert halved is not None
        self.probe = halved
        if self.reference_probe is not None:
            self.reference_probe = _halved(self.reference_probe)
        return trace

    def _attempt(
        self, probe: SpinalProbe, step: int
    ) -> tuple[DepthTrace | None, BaseException | None]:
        try:
            return probe.run(step), None
        except Exception as error:  # the training run must outlive any probe failure
            _release_cached_memory()
            return None, error

    def _give_up(self, step: int, error: BaseException, when: str) -> None:
        self.disabled = True
        logger.error("spinal-callback: the probe failed%s at step %d", when, step, exc_info=error)
        self._raise(
            _probe_alert(
                step,
                f"the probe failed{when} ({error!r}); probing is off for this run and training "
                "goes on (the traceback is in the log; please report it if the model is supported)",
            )
        )


def _rank_suffix() -> str:
    """``""`` on rank 0, ``.rank<k>`` on rank ``k``: each rank writes its own files."""
    rank = distributed.rank()
    return "" if rank == 0 else f".rank{rank}"


def _resumed_record(step: int, superseded: Sequence[Mapping[str, Any]]) -> Alert:
    """The record a resume from ``step`` appends: what it supersedes, one entry a record."""
    if superseded:
        listed = "; ".join(
            f"{record.get('level')} {record.get('rule')} at step {record.get('step')}"
            for record in superseded
        )
        what = (
            f"it supersedes {len(superseded)} record(s) of the interrupted segment after step "
            f"{step} (kept above in the event log): {listed}"
        )
    else:
        what = f"no record after step {step} is superseded"
    return Alert(
        step=step,
        level="info",
        rule=RESUMED,
        metric="spinal/resume",
        value=float(step),
        threshold=float("nan"),
        message=f"the run resumed from its checkpoint of step {step}; {what}",
    )


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocator failure (CUDA, MPS or host), the one error a smaller batch fixes."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _failed_elsewhere() -> RuntimeError:
    return RuntimeError("the probe failed on another rank")


def _halved(probe: SpinalProbe) -> SpinalProbe:
    neutral = probe.neutral_batch
    return SpinalProbe(
        probe.model, _half(probe.batch), probe.config, None if neutral is None else _half(neutral)
    )


def _half(batch: ProbeBatch) -> ProbeBatch:
    rows = batch.input_ids.shape[0] // 2
    if rows == 0:
        raise ValueError("the probe batch has a single row and cannot be halved")
    return ProbeBatch(batch.input_ids[:rows], batch.attention_mask[:rows])


def _probe_change(reference: DepthTrace, trace: DepthTrace) -> str | None:
    """How ``trace`` was probed otherwise than ``reference`` (its texts, layers or batch size:
    the fingerprint; or the lens's logit scale, e.g. against a reference saved before the
    lens was checked), or ``None`` when the two compare."""
    if trace.probe_fingerprint != reference.probe_fingerprint:
        return (
            f"fingerprint {reference.probe_fingerprint[:8]} -> {trace.probe_fingerprint[:8]}: "
            "other texts, layers or batch size"
        )
    before, now = reference.metadata.get("logit_scale"), trace.metadata.get("logit_scale")
    if not same_logit_scale(before, now):
        shown = ["none" if scale is None else f"{scale:.4g}" for scale in (before, now)]
        return f"the lens's logit scale {shown[0]} -> {shown[1]}"
    return None


def _probe_alert(step: int, message: str) -> Alert:
    return Alert(
        step=step,
        level="warning",
        rule=PROBE_FAILED,
        metric="spinal/probe",
        value=float("nan"),
        threshold=float("nan"),
        message=message,
    )


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def muted_neutral_rules_note(reference: DepthTrace) -> str | None:
    """Why ``language_drift`` and ``trace_departure`` stay silent for this run, or ``None``.

    They need a reference that predicts the neutral texts clearly better than chance; a
    random-initialised model, or neutral texts in a language the model does not know, has no
    language for them to watch.
    """
    neutral = reference.neutral
    nll = None if neutral is None else neutral.next_token_nll
    if nll is None or not math.isfinite(nll) or has_language(reference):
        return None
    assert neutral is not None
    vocabulary = neutral.metadata.get("vocab_size")
    chance = "unknown"
    if isinstance(vocabulary, int) and vocabulary > 1:
        chance = f"{math.log(vocabulary):.2f}"
    return (
        f"the reference predicts the neutral texts little better than chance (next-token NLL "
        f"{nll:.2f} nats against ln V = {chance}); language_drift and "
        "trace_departure are off for this run. Pass neutral_texts= in the model's language, or "
        "expect only the log rules and non_finite on a random-initialised model"
    )


@contextlib.contextmanager
def _failures_logged(what: str, consequence: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # a missing reference or drift must not end training
        _release_cached_memory()
        logger.exception("spinal-callback: the %s failed; %s", what, consequence)


__all__ = [
    "CONTINUE",
    "Decision",
    "Runner",
    "build_probe_batch",
    "is_out_of_memory",
    "muted_neutral_rules_note",
]
