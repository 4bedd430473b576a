"""Runner: the probe inside a training loop, with no framework in sight.

An adapter translates its framework's events into these calls, on every rank at the same points:

    runner.setup(model, tokenizer, dataset, reference_model)   # build; bad input raises here
    runner.watch_training(training_state)                        # on_critical="recover" only
    runner.begin(step, outputs, directory)    -> Decision       # train start (step > 0: resume)
    runner.step(step)                         -> Decision       # after each optimizer step
    runner.logs(step, logs)                   -> Decision       # the trainer's logged scalars
    runner.saved(step, path)                                     # a checkpoint was written
    runner.end(step)                                             # train end

and acts on the ``Decision``: when ``stop`` is true, save a checkpoint and stop. With
``on_critical="recover"`` the runner rewinds the training state itself (``Recovery``) and the
adapter has nothing to do. The runner owns the schedule, the events and the state; each other
job has its own small class: the guarded probe (``GuardedProbe``), the reference and the rules
(``Baseline``), the stop and its advice (``StopLedger``), the good state and the rewinds
(``Recovery``), the run's files (``RunFiles``). See ARCHITECTURE.md.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from spinal_callback import distributed
from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.outputs.history import TraceHistory
from spinal_callback.outputs.ownership import new_run_id
from spinal_callback.outputs.sinks import AlertHook, Outputs, check_alert_hook
from spinal_callback.outputs.tensorboard import summary_scalars
from spinal_callback.probe.drift import DriftMeter, drift_scalars
from spinal_callback.probe.spinal_probe import SpinalProbe
from spinal_callback.probe.texts import check_texts
from spinal_callback.training.baseline import Baseline
from spinal_callback.training.cadence import Cadence
from spinal_callback.training.guarded_probe import GuardedProbe, failures_logged
from spinal_callback.training.recovery import Recovery, RecoveryReport, TrainingState
from spinal_callback.training.run_files import RunFiles
from spinal_callback.training.state import STATE_VERSION, upgrade_state
from spinal_callback.training.stop_ledger import CONTINUE, TOOL_RULES, Decision, StopLedger

logger = logging.getLogger("spinal_callback")
HEAVY_LENS = 1.5
"""``SpinalProbe.lens_work`` above which setup warns that the lens will outweigh the forward:
the real SmolLM2-135M's 5-token recipe prompts (2.05; a probe measured 2.23 bare forwards on a
2-core CPU) are above it, its prose paragraphs (0.32-0.34; 1.21-1.35) well below."""
ReduceAny = Callable[[bool], bool]


class Runner:
    """The events and the state of one training run.

    Args:
        config: the run's ``SpinalConfig``.
        probe_texts: probe texts; ``None`` takes prompts from the train dataset at ``setup``.
            Checked here (``texts.check_texts``): a bare string, an empty list or blank texts
            raise at construction.
        neutral_texts: neutral texts (``None``: ``texts.DEFAULT_NEUTRAL_TEXTS``).
        on_alert: called with every ``Alert`` (on every rank); an exception it raises is logged,
            never propagated; not a callable: ``TypeError`` here.
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
        self.keep_good_checkpoint = keep_good_checkpoint
        self._probe_texts = None if probe_texts is None else check_texts(probe_texts, "probe_texts")
        self._neutral_texts = (
            None if neutral_texts is None else check_texts(neutral_texts, "neutral_texts")
        )
        self._on_alert = check_alert_hook(on_alert)
        self.reduce_any = reduce_any
        self._run_id = new_run_id()
        self._files = RunFiles(self._run_id)
        self._guard: GuardedProbe | None = None
        self._baseline = Baseline(config)
        self._ledger = StopLedger(config)
        self._outputs = Outputs(on_alert=on_alert)
        self._history = TraceHistory(run_id=self._run_id)
        self._drift: DriftMeter | None = None
        self._alerts: list[Alert] = []
        self._pending: dict[str, float] = {}
        self._last_probe_step = -1
        self._probes_run = 0
        self._worst_level = 0
        self._begun = False
        self._trouble_anywhere = False
        self._recovery = Recovery(config) if config.on_critical == "recover" else None
        self._cadence = Cadence(config)
        self._warned_since_probe = False
        self._recovered_at = -1
        self._logs_span_recovery = False

    # ---- read-only views for the adapters and the tests -------------------------------------

    run_id = property(lambda self: self._run_id, doc="In every record and checkpoint.")
    begun = property(lambda self: self._begun, doc="``begin`` ran: the runner has its run.")
    traces = property(lambda self: self._history.traces, doc="The current probe's traces.")
    alerts = property(lambda self: list(self._alerts), doc="The alerts raised in this process.")
    last_probe_step = property(lambda self: self._last_probe_step)
    probes_run = property(lambda self: self._probes_run)
    worst_level = property(lambda self: self._worst_level, doc="``spinal/alert_level_max``.")
    reference = property(lambda self: self._baseline.reference)
    monitor = property(lambda self: self._baseline.monitor)
    drift = property(lambda self: self._drift)
    history = property(lambda self: self._history)
    outputs = property(lambda self: self._outputs, doc="The sinks ``begin`` attached.")
    stopped = property(lambda self: self._ledger.stopped)
    stop_requested = property(lambda self: self._ledger.stop_requested)
    stop_checkpoint = property(lambda self: self._ledger.stop_checkpoint)
    first_warning_step = property(lambda self: self._ledger.first_warning_step)
    recovery = property(lambda self: self._recovery, doc="``None`` unless recovering.")

    @property
    def recoveries(self) -> list[RecoveryReport]:
        """This process's recoveries, in order (empty without ``on_critical="recover"``)."""
        return [] if self._recovery is None else self._recovery.reports

    @property
    def probe(self) -> SpinalProbe | None:
        return None if self._guard is None else self._guard.probe

    @property
    def reference_probe(self) -> SpinalProbe | None:
        return None if self._guard is None else self._guard.reference_probe

    @property
    def disabled(self) -> bool:
        return self._guard is not None and self._guard.disabled

    def use_monitor(self, monitor: RampMonitor) -> None:
        """Score with ``monitor`` from now on (a ``RampMonitor`` with other rules, or one that
        records its inputs, as the benchmarks do); before the first probe."""
        self._baseline.use_monitor(monitor)

    def resume_advice(self) -> str:
        """Which checkpoint to resume from (``StopLedger.resume_advice``)."""
        return self._ledger.resume_advice()

    # ---- events ------------------------------------------------------------------------------

    def setup(
        self,
        model: nn.Module,
        tokenizer: Any,
        dataset: Any = None,
        reference_model: nn.Module | None = None,
    ) -> None:
        """Build the probe (and the reference probe); raise on any bad input (a reference
        model of another architecture or size: ``model_access.check_reference_model``). Every
        rank calls it: the ranks take rank 0's run identity here."""
        self._set_run_id(distributed.rank_zeros(self._run_id))
        config = self.config
        self._guard = GuardedProbe.build(
            config,
            (model, reference_model),
            tokenizer,
            (self._probe_texts, self._neutral_texts, dataset),
            self._reduce,
            self._raise,
        )
        warn_of_a_heavy_lens(self._guard.probe, config)
        if config.drift_every is not None:
            batch = self._guard.probe.batch
            self._drift = DriftMeter(batch, config.seed + 2, config.autocast_dtype)

    def watch_training(self, training: TrainingState) -> None:
        """The training state a recovery restores (``on_critical="recover"``; without it this
        does nothing). Call at train begin, before ``begin``, once the optimizer exists.

        A collective under several ranks: a refusal on any rank raises on every rank.

        Raises:
            MemoryError: its two host snapshots would not fit (``Recovery.watch``).
            OSError: ``recover_snapshot_dir`` has no room for them.
            RuntimeError: another rank refused.
        """
        if self._recovery is None:
            return
        refused: Exception | None = None
        try:
            self._recovery.watch(training, self._run_id)
        except (MemoryError, OSError, ValueError) as error:
            refused = error
        if self.reduce_any(refused is not None):
            raise refused or RuntimeError(
                "on_critical='recover' was refused on another rank (its log says why)"
            )

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
        self._begun = True
        outputs.on_alert, outputs.run_id = self._on_alert, self._run_id
        self._outputs = outputs
        outputs.point_to_views()
        if reduce_any is not None:
            self.reduce_any = reduce_any
        folder = None if directory is None else Path(directory)
        self._files.lock(outputs, folder)
        if folder is not None:
            self._files.open(folder, step, self._history, self._drift, outputs)
            if self.reference is not None:
                self._files.save_reference(self.reference, self._event_log_path())
        if step > 0:
            self._files.mark_resume(step, folder, outputs)
            if outputs.board is not None:
                outputs.board.restore_worst_level(self._worst_level)
        if outputs.board is not None and self._drift is not None:
            outputs.board.chart_drift()
        self._chart_recoveries(step)
        if step == 0 and self._last_probe_step < 0:
            self._probe(0)
            decision = self._decide(0)
            self._keep_good_state(0, decision, start=True)
            return decision
        return CONTINUE

    def step(self, step: int) -> Decision:
        """After an optimizer step: probe when due (``Cadence``), then decide."""
        self._cadence.step_event()
        started = time.perf_counter()
        try:
            return self._step(step)
        finally:
            self._cadence.own_work(time.perf_counter() - started)

    def _step(self, step: int) -> Decision:
        if not self._cadence.due(step, self._last_probe_step):
            return CONTINUE
        started = time.perf_counter()
        self._probe(step)
        self._set_interval(step, time.perf_counter() - started)
        decision = self._decide(step)
        if not decision.recovered:
            self._chart_recoveries(step)
        self._keep_good_state(step, decision, start=False)
        if (
            decision.stop
            or decision.recovered
            or not self.keep_good_checkpoint
            or self._trouble_anywhere
        ):
            return decision
        trouble = self._ledger.first_warning_step is not None or self.disabled
        self._trouble_anywhere = self._reduce(trouble)
        return CONTINUE if self._trouble_anywhere else Decision(save_good=True)

    def logs(self, step: int, logs: Mapping[str, Any]) -> Decision:
        """The trainer's logged scalars (loss, DPO rewards): score them, then decide. Logs up to
        a recovery's step describe the updates it dropped, and are not scored."""
        started = time.perf_counter()
        try:
            return self._score_logs(step, logs)
        finally:
            self._cadence.own_work(time.perf_counter() - started)

    def _score_logs(self, step: int, logs: Mapping[str, Any]) -> Decision:
        if step <= self._recovered_at or self._logs_span_recovery:
            # This log closes the window that held the dropped steps (HF and TRL average
            # their logs over every step since the previous one).
            self._logs_span_recovery = False
            return CONTINUE
        alerts = self._baseline.score_logs(step, logs)
        self._note_levels(alerts)
        self._outputs.level(step, alerts)
        if alerts:
            # Forwarded with the next logs, like a probe's level (the highest one wins).
            level = float(max(alert.severity for alert in alerts))
            self._pending["spinal/alert_level"] = max(
                level, self._pending.get("spinal/alert_level", 0.0)
            )
        for alert in alerts:
            self._raise(alert)
        if alerts:
            self._outputs.flush()
        decision = self._decide(step)
        if decision.recovered:
            self._logs_span_recovery = False
        return decision

    def saved(self, step: int, path: str) -> None:
        """A checkpoint of the run was written at ``step`` to ``path``."""
        self._ledger.saved(int(step), str(path), self._outputs)

    def end(self, step: int) -> None:
        """Train end: a last probe if this step has none (and the run was not stopped: the
        stop's own step is the last that matters), the final heatmap, close the sinks, unlock.
        No stop decision: training is over."""
        if step != self._last_probe_step and not self.stopped:
            self._probe(step)
        if self._history.traces:
            self._outputs.heatmap(self._history.traces, self.reference, self._alerts)
        level, summary = self._ledger.summary(step, len(self._history), self._alerts)
        if self.recoveries:
            lost = sum(report.steps_lost for report in self.recoveries)
            summary += (
                f"; {len(self.recoveries)} recoveries ({lost} steps of updates dropped, learning "
                f"rate x{self.recoveries[-1].lr_scale:.4g})"
            )
        logger.log(level, "spinal-callback: %s", summary)
        self._outputs.close()
        if self._recovery is not None:
            self._recovery.close()
        self.release()

    def release(self) -> None:
        """Unlock this run's files (``end`` does it)."""
        self._files.release()

    def pop_scalars(self) -> dict[str, float]:
        """Scalars of the probes not yet handed to the trainer's loggers."""
        scalars, self._pending = self._pending, {}
        return scalars

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable and bounded; each part under its owner's key, with a version."""
        return {
            "version": STATE_VERSION,
            "run": self._run_id,
            "schedule": {
                "last_probe_step": self._last_probe_step,
                "probes_run": self._probes_run,
                "worst_level": self._worst_level,
                "disabled": self.disabled,
            },
            "files": self._files.state_dict(self._history, self._outputs),
            "history": self._history.state_dict(),
            "baseline": self._baseline.state_dict(),
            "ledger": self._ledger.state_dict(),
            "drift": None if self._drift is None else self._drift.state_dict(),
            "recovery": None if self._recovery is None else self._recovery.state_dict(),
            "cadence": self._cadence.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s output, or an older version's (``state.upgrade_state``).
        Call after ``setup``."""
        guard = self._require_setup()
        state = upgrade_state(state)
        self._set_run_id(str(state.get("run") or self._run_id))
        schedule = state["schedule"]
        self._last_probe_step = int(schedule["last_probe_step"])
        self._probes_run = int(schedule["probes_run"])
        self._worst_level = int(schedule.get("worst_level", 0))
        guard.restore(bool(schedule["disabled"]))
        self._files.load_state_dict(state.get("files", {}))
        self._history.load_state_dict(state["history"])
        self._baseline.load_state_dict(state["baseline"])
        self._ledger.load_state_dict(state["ledger"])
        if self._drift is not None:
            self._drift.load_state_dict(state.get("drift"))
        self._baseline.share_lens_tokens(guard.probe)
        if self._recovery is not None and state.get("recovery"):
            self._recovery.load_state_dict(state["recovery"])
        self._cadence.load_state_dict(state.get("cadence") or {})

    # ---- internals ---------------------------------------------------------------------------

    def _require_setup(self) -> GuardedProbe:
        if self._guard is None:
            raise RuntimeError("Runner.setup() must run before the training events")
        return self._guard

    def _set_run_id(self, run_id: str) -> None:
        self._run_id = self._files.run_id = self._history.run_id = run_id

    def _reduce(self, flag: bool) -> bool:
        return self.reduce_any(flag)

    def _decide(self, step: int) -> Decision:
        """The stop collective; with recovery, a requested stop tries a recovery first."""
        if self._recovery is None:
            return self._ledger.decide(step, self._reduce, self._outputs)
        return self._ledger.decide(
            step, self._reduce, self._outputs, lambda cause: self._recover(step, cause)
        )

    def _recover(self, step: int, cause: Alert | None) -> Decision | str:
        """Every rank: recover if no rank refuses (``Recovery.refusal``), else say why not."""
        recovery = self._recovery
        assert recovery is not None
        why_not = recovery.refusal(cause)
        if self._reduce(why_not is not None):
            return why_not or "another rank could not recover"
        report, rules = recovery.recover(step, cause)
        self._baseline.restore_rules(copy.deepcopy(rules))
        self._ledger.recovered(report.rewound_to)
        self._recovered_at = step
        self._logs_span_recovery = True
        self._trouble_anywhere = True
        self._warned_since_probe = False
        record = report.record(self.config.max_recoveries)
        self._outputs.record(record)
        logger.warning("spinal-callback: %s", record.message)
        self._chart_recoveries(step)
        self._outputs.flush()
        return Decision(recovered=True, message=record.message)

    def _chart_recoveries(self, step: int) -> None:
        """``spinal/recoveries``, the count so far, at train begin, at every probe and at each
        recovery: a step function that TensorBoard's smoothing soon shows at its true value."""
        if self._recovery is None:
            return
        scalars = {"spinal/recoveries": float(self._recovery.attempts)}
        self._pending.update(scalars)
        self._outputs.scalars(step, scalars)

    def _keep_good_state(self, step: int, decision: Decision, start: bool) -> None:
        """After a probe's decision (every rank): a quiet probe, where no rank warned since the
        previous one, keeps a snapshot of the training state (``Recovery.at_probe``)."""
        if self._recovery is None or decision.stop or decision.recovered:
            return
        quiet = not self._reduce(self._warned_since_probe)
        self._warned_since_probe = False
        rules = copy.deepcopy(self._baseline.rules_state()) if quiet else {}
        self._recovery.at_probe(step, quiet, rules, start, self._reduce)

    def _probe(self, step: int) -> None:
        """Probe (every rank), score against the reference, record and write."""
        guard = self._require_setup()
        self._last_probe_step = step
        drift_every = self.config.drift_every
        drift_due = drift_every is not None and self._probes_run % drift_every == 0
        self._probes_run += 1
        trace = guard.run(step)
        if trace is None:
            return
        reference = self.reference
        if self._baseline.adopt(trace, lambda: guard.trace_reference(step), self._outputs.note):
            self._history.restart()
            if self._recovery is not None:
                self._recovery.forget()
        if self.reference is not reference and self.reference is not None:
            self._files.save_reference(self.reference, self._event_log_path())
        self._history.append(trace)
        alerts = self._baseline.score(trace)
        self._note_levels(alerts)
        self._pending.update(summary_scalars(trace, self.reference))
        self._pending["spinal/alert_level"] = float(max((a.severity for a in alerts), default=0))
        if drift_due:
            self._record_drift(step, guard)
        self._outputs.trace(trace, self.reference, alerts)
        for alert in alerts:
            self._raise(alert)
        if len(self._history) % self.config.image_every == 0:
            self._outputs.heatmap(self._history.traces, self.reference, self._alerts)
        self._outputs.flush()

    def _event_log_path(self) -> Path | None:
        log = self._outputs.event_log
        return None if log is None else log.path

    @property
    def every_n_steps(self) -> int:
        """The probe interval now: ``every_n_steps``, or the automatic cadence's."""
        return self._cadence.interval

    def _set_interval(self, step: int, probe_seconds: float) -> None:
        """After a probe (every rank): the automatic cadence's next interval, charted as
        ``spinal/every_n_steps`` and noted when it changes."""
        change = self._cadence.probed(probe_seconds, self._reduce)
        scalars = {"spinal/every_n_steps": float(self._cadence.interval)}
        self._pending.update(scalars)
        self._outputs.scalars(step, scalars)
        if change is not None:
            self._outputs.note(step, change)

    def _note_levels(self, alerts: Sequence[Alert]) -> None:
        self._worst_level = max([self._worst_level, *(int(a.severity) for a in alerts)])

    def _raise(self, alert: Alert) -> None:
        """Record; tell the ledger (first warning, stop request); hand to the sinks."""
        self._alerts.append(alert)
        if alert.severity >= AlertLevel.WARNING and alert.rule not in TOOL_RULES:
            self._warned_since_probe = True
        self._ledger.note(alert)
        self._outputs.alert(alert)

    def _record_drift(self, step: int, guard: GuardedProbe) -> None:
        """Measure every block's drift; hand it to the loggers and write it."""
        drift = self._drift
        assert drift is not None
        with failures_logged("drift measurement", "this probe has no drift"):
            measured = drift.measure(guard.probe.parts, lambda: guard.reference_outputs(drift))
            scalars = drift_scalars(measured)
            self._pending.update(scalars)
            self._outputs.scalars(step, scalars)


def warn_of_a_heavy_lens(probe: SpinalProbe, config: SpinalConfig) -> None:
    """At setup: say so when the probe texts are so short that the logit lens will outweigh
    the forward (``SpinalProbe.lens_work`` above ``HEAVY_LENS``), and what to do about it."""
    work = probe.lens_work()
    if work is None or work <= HEAVY_LENS:
        return
    tokens = sum(group.batch.num_valid_tokens for group in probe.groups)
    cadence = (
        "every_n_steps='auto' keeps the probes within overhead_budget as long as the interval "
        "it needs is at most auto_max_steps"
        if config.every_n_steps == "auto"
        else "every_n_steps='auto' keeps the probes within overhead_budget whatever they cost "
        "(up to an interval of auto_max_steps)"
    )
    logger.warning(
        "spinal-callback: the probe texts are short (%d valid tokens, task and neutral "
        "together), so the logit lens at %d late blocks does about %.1fx the multiply-adds of a "
        "forward over them: a probe will cost more than 2 bare forwards. Longer probe texts (a "
        "paragraph each: the lens takes a bounded sample of tokens, the forward all of them) "
        "or fewer late_layers make it cheaper; %s",
        tokens,
        len(probe.layers),
        work,
        cadence,
    )


__all__ = ["CONTINUE", "Decision", "Runner"]
