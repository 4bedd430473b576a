"""ProbeSession: what both training callbacks share, so the adapters only decide when and where.

It builds the probe at setup (every configuration error surfaces there), probes on schedule,
traces the reference once, measures per-layer drift every ``drift_every`` probes, keeps the trace
history, writes to TensorBoard on the main process, survives probe failures, and round-trips its
state through checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback import distributed
from spinal_callback.config import SpinalConfig
from spinal_callback.detector import RampMonitor
from spinal_callback.drift import (
    DRIFT_TOKENS,
    activation_drift,
    block_outputs,
    decode_activations,
    drift_scalars,
    encode_activations,
    load_activations,
    save_activations,
)
from spinal_callback.events import Alert, AlertLevel, EventLog
from spinal_callback.model_access import ModelParts, peft_model_in
from spinal_callback.probe import ProbeBatch, SpinalProbe
from spinal_callback.rules.language import has_language
from spinal_callback.tensorboard import TraceBoard, summary_scalars
from spinal_callback.texts import DEFAULT_NEUTRAL_TEXTS
from spinal_callback.trace import DepthTrace

logger = logging.getLogger("spinal_callback")
STATE_VERSION = 1
_LOG_LEVELS = {
    AlertLevel.INFO: logging.INFO,
    AlertLevel.WARNING: logging.WARNING,
    AlertLevel.CRITICAL: logging.ERROR,
}
AlertHook = Callable[[Alert], None]


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
    if probe_texts:
        return ProbeBatch.from_texts(tokenizer, list(probe_texts), config.max_probe_length)
    if dataset is None:
        raise ValueError(
            "spinal-callback has no probe texts and no train dataset to take prompts from: "
            "pass probe_texts=[...] to the callback"
        )
    return ProbeBatch.from_dataset(tokenizer, dataset, max_length=config.max_probe_length)


class ProbeSession:
    """Schedule, history, reference, failure handling and output of the probe during training.

    Args:
        config: the run's ``SpinalConfig``.
        probe_texts: probe texts; ``None`` takes prompts from the train dataset.
        on_alert: called with every ``Alert`` raised (on every rank).
    """

    def __init__(
        self,
        config: SpinalConfig,
        probe_texts: Sequence[str] | None = None,
        on_alert: AlertHook | None = None,
        neutral_texts: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.probe_texts = list(probe_texts) if probe_texts is not None else None
        self.neutral_texts = list(neutral_texts) if neutral_texts is not None else None
        self.on_alert = on_alert
        self.probe: SpinalProbe | None = None
        self.reference_probe: SpinalProbe | None = None
        self.board: TraceBoard | None = None
        self.history: list[DepthTrace] = []
        self.reference: DepthTrace | None = None
        self.alerts: list[Alert] = []
        self.last_probe_step = -1
        self.disabled = False
        self.pending_logs: dict[str, float] = {}
        self.monitor = RampMonitor(config)
        self.event_log: EventLog | None = None
        self.stop_requested = False
        self.probes_run = 0
        self.drift_batch: ProbeBatch | None = None
        self.drift_index: Tensor | None = None
        self.drift_fingerprint: str | None = None
        self.drift_reference: Tensor | None = None
        self.drift_reference_is_snapshot = False
        self.drift_reference_path: Path | None = None
        self.drift_reference_sha256: str | None = None
        self.drift_reference_fingerprint: str | None = None
        self.last_drift: Tensor | None = None

    def setup(
        self,
        model: nn.Module,
        tokenizer: Any,
        dataset: Any = None,
        reference_model: nn.Module | None = None,
    ) -> None:
        """Build the probe (and the reference probe); raise ``ValueError`` on any bad input.

        With ``drift_every`` set, also fix the drift tokens: ``DRIFT_TOKENS`` real tokens of the
        full probe batch (kept when a failing probe is halved).
        """
        batch = build_probe_batch(self.config, tokenizer, self.probe_texts, dataset)
        neutral = None
        if self.config.neutral_probe:
            texts = self.neutral_texts or list(DEFAULT_NEUTRAL_TEXTS)
            neutral = ProbeBatch.from_texts(tokenizer, texts, self.config.max_probe_length)
        self.probe = SpinalProbe(model, batch, self.config, neutral)
        if reference_model is not None:
            self.reference_probe = SpinalProbe(reference_model, batch, self.config, neutral)
        if self.config.drift_every is not None:
            self.drift_batch = batch
            self.drift_index = batch.subsample(DRIFT_TOKENS, self.config.seed + 2)
            self.drift_fingerprint = _tokens_fingerprint(batch, self.drift_index)

    def attach_outputs(self, board: TraceBoard | None, log_dir: str, resume_step: int = 0) -> None:
        """Write to ``board`` (main process only; ``None`` elsewhere) and to the event log.

        The event log is ``<log_dir>/spinal_events.jsonl`` (or ``config.event_log``) on the main
        process and ``spinal_events.rank<k>.jsonl`` beside it on rank ``k``, so an alert raised on
        one rank only is on disk too. On resume, TensorBoard events newer than ``resume_step``
        left by the interrupted run are hidden.
        """
        self.board = board
        suffix = "" if distributed.rank() == 0 else f".rank{distributed.rank()}"
        self.drift_reference_path = Path(log_dir) / f"spinal_drift_reference{suffix}.safetensors"
        if board is not None and self.config.drift_every is not None:
            board.chart_drift()
        main_log = Path(self.config.event_log or Path(log_dir) / "spinal_events.jsonl")
        rank = distributed.rank()
        path = main_log if rank == 0 else main_log.with_name(f"{main_log.stem}.rank{rank}.jsonl")
        self.event_log = EventLog(path)
        if board is not None and resume_step > 0:
            board.purge_after(resume_step)

    def is_due(self, step: int) -> bool:
        """Every ``every_n_steps`` steps, once per step. The same on every rank (it ignores
        rank-local state such as a disabled probe), so collectives keyed on it always match."""
        return step != self.last_probe_step and step % self.config.every_n_steps == 0

    def probe_at(self, model: nn.Module, step: int) -> DepthTrace | None:
        """Probe now (every rank), score, record and write (main process).

        On every ``drift_every``-th call (the first, then every ``drift_every``; restored runs
        continue the count) whose probe succeeded, also measure the per-layer drift.
        Returns ``None`` when probing is disabled or failed. Alerts at or above ``stop_on`` set
        ``stop_requested``; call ``decide_stop`` on every rank to agree on stopping.
        """
        self.last_probe_step = step
        drift_due = self.config.drift_every is not None and (
            self.probes_run % self.config.drift_every == 0
        )
        self.probes_run += 1
        trace = None if self.disabled else self._run_safely(step)
        if trace is None:
            return None
        if self.reference is None:
            self.reference = self._reference_trace(model, step) or trace
            self.monitor.set_reference(self.reference)
            note = muted_neutral_rules_note(self.reference)
            if note is not None:
                logger.warning("spinal-callback: %s", note)
                if self.board is not None:
                    self.board.write_note(step, note)
        self.history.append(trace)
        alerts = self.monitor.update(trace)
        self.pending_logs.update(summary_scalars(trace, self.reference))
        self.pending_logs["spinal/alert_level"] = float(
            max((a.severity for a in alerts), default=0)
        )
        if drift_due:
            self._record_drift(model, step)
        if self.board is not None:
            self.board.write_trace(trace, self.reference)
            self.board.write_alerts(step, alerts)
        for alert in alerts:
            self.raise_alert(alert)
        if self.board is not None:
            if len(self.history) % self.config.image_every == 0:
                self.board.write_heatmap(self.history)
            self.board.flush()
        return trace

    def observe_logs(self, step: int, logs: Mapping[str, Any]) -> list[Alert]:
        """Score the trainer's logged scalars (loss, DPO rewards) and raise what they trigger.

        Call it on every rank at the same steps (every logging step), then ``decide_stop``.
        """
        alerts = self.monitor.update_logs(step, logs)
        if alerts and self.board is not None:
            self.board.write_alerts(step, alerts)
            self.board.flush()
        for alert in alerts:
            self.raise_alert(alert)
        return alerts

    def decide_stop(self) -> bool:
        """True on every rank if any rank asked to stop; a collective: call it on all ranks at
        the same steps (every probe step and every logging step)."""
        return distributed.any_rank(self.stop_requested)

    def finish(self) -> None:
        """Write the final heatmap and flush (call at the end of training)."""
        if self.board is not None and self.history:
            self.board.write_heatmap(self.history)
            self.board.flush()

    def pop_pending_logs(self) -> dict[str, float]:
        """Summaries of probes not yet passed to the trainer's loggers."""
        logs, self.pending_logs = self.pending_logs, {}
        return logs

    def raise_alert(self, alert: Alert) -> None:
        """Record, log, write (event log first: it must survive a crash) and hand to the hook."""
        self.alerts.append(alert)
        stop_on = self.config.stop_on
        if stop_on is not None and alert.severity >= AlertLevel.parse(stop_on):
            self.stop_requested = True
        if self.event_log is not None:
            self.event_log.append(alert)
        logger.log(
            _LOG_LEVELS[alert.severity],
            "spinal-callback step %d [%s] %s",
            alert.step,
            alert.level,
            alert.message,
        )
        if self.board is not None:
            self.board.write_alert_text(alert)
        if self.on_alert is not None:
            self.on_alert(alert)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: schedule position, history, references, failure flag.

        The drift reference (float32 ``[blocks, tokens, hidden]``) is kept only when it is a
        snapshot of the policy (a reference model is measured again after a resume): as the path
        and sha256 of its safetensors file beside the event log, or inline as base64 when the
        session has no log directory.
        """
        drift_reference = None
        if self.drift_reference is not None and self.drift_reference_is_snapshot:
            stored = (
                {"file": str(self.drift_reference_path), "sha256": self.drift_reference_sha256}
                if self.drift_reference_sha256 is not None
                else encode_activations(self.drift_reference)
            )
            drift_reference = {"fingerprint": self.drift_reference_fingerprint, **stored}
        return {
            "version": STATE_VERSION,
            "last_probe_step": self.last_probe_step,
            "probes_run": self.probes_run,
            "drift_reference": drift_reference,
            "disabled": self.disabled,
            "history": [trace.to_dict() for trace in self.history],
            "reference": self.reference.to_dict() if self.reference is not None else None,
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (e.g. from a checkpoint)."""
        if int(state.get("version", 0)) > STATE_VERSION:
            raise ValueError(
                f"spinal-callback state version {state['version']} is newer than {STATE_VERSION}; "
                "upgrade spinal-callback to resume this checkpoint"
            )
        self.last_probe_step = int(state["last_probe_step"])
        self.disabled = bool(state["disabled"])
        self.history = [DepthTrace.from_dict(trace) for trace in state["history"]]
        reference = state.get("reference")
        self.reference = DepthTrace.from_dict(reference) if reference else None
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
        if self.monitor.reference is None and self.reference is not None:
            self.monitor.set_reference(self.reference)
        self.probes_run = int(state.get("probes_run", len(self.history)))
        self._load_drift_reference(state.get("drift_reference") or {})

    def _load_drift_reference(self, entry: dict[str, Any]) -> None:
        """Restore a stored policy-snapshot drift reference (``state_dict``'s entry)."""
        self.drift_reference = _stored_reference(entry) if entry else None
        self.drift_reference_is_snapshot = self.drift_reference is not None
        if self.drift_reference is None:
            return
        self.drift_reference_fingerprint = entry.get("fingerprint")
        if "file" in entry:
            self.drift_reference_path = Path(entry["file"])
            self.drift_reference_sha256 = entry["sha256"]

    def _reference_trace(self, model: nn.Module, step: int) -> DepthTrace | None:
        """The reference traced once: TRL's ``ref_model``, else the PEFT model with adapters off."""
        assert self.probe is not None
        with _failures_logged("reference probe", "the first trace is the baseline"):
            if self.reference_probe is not None:
                return self.reference_probe.run(step)
            peft_model = peft_model_in(model)
            if peft_model is not None:
                with peft_model.disable_adapter():  # type: ignore[operator]
                    return self.probe.run(step)
        return None

    def _record_drift(self, model: nn.Module, step: int) -> None:
        """Measure the drift of every block; hand it to the loggers and write it (main process)."""
        drift = self._measure_drift(model)
        if drift is None:
            return
        self.last_drift = drift
        scalars = drift_scalars(drift)
        self.pending_logs.update(scalars)
        if self.board is not None:
            self.board.write_scalars(step, scalars)

    def _measure_drift(self, model: nn.Module) -> Tensor | None:
        """float32 ``[blocks]`` drift on the CPU (``drift.activation_drift``); ``None`` when the
        measurement failed (logged; training goes on)."""
        assert self.probe is not None, "ProbeSession.setup() must run before probing"
        with _failures_logged("drift measurement", "this probe has no drift"):
            policy = self._block_outputs(self.probe.parts)
            return activation_drift(policy, self._drift_reference(model, policy)).cpu()
        return None

    def _drift_reference(self, model: nn.Module, policy: Tensor) -> Tensor:
        """The reference's block outputs, measured once and cached (float32, on the CPU): TRL's
        ``ref_model``, else the PEFT model with adapters off, else ``policy`` (this snapshot)."""
        stored = self.drift_reference
        if stored is not None and (
            self.drift_reference_fingerprint != self.drift_fingerprint
            or stored.shape != policy.shape
        ):
            logger.warning(
                "spinal-callback: the stored drift reference was measured on other probe tokens "
                "or another model; measuring the reference again"
            )
            self.drift_reference = None
        if self.drift_reference is None:
            reference = self._reference_block_outputs(model)
            self.drift_reference_is_snapshot = reference is None
            self.drift_reference = (policy if reference is None else reference).cpu()
            self.drift_reference_fingerprint = self.drift_fingerprint
            self.drift_reference_sha256 = None
            if self.drift_reference_is_snapshot and self.drift_reference_path is not None:
                self.drift_reference_sha256 = save_activations(
                    self.drift_reference_path, self.drift_reference
                )
        return self.drift_reference

    def _reference_block_outputs(self, model: nn.Module) -> Tensor | None:
        """Block outputs of TRL's ``ref_model``, else of the PEFT model with adapters off."""
        assert self.probe is not None
        if self.reference_probe is not None:
            return self._block_outputs(self.reference_probe.parts)
        peft_model = peft_model_in(model)
        if peft_model is not None:
            with peft_model.disable_adapter():  # type: ignore[operator]
                return self._block_outputs(self.probe.parts)
        return None

    def _block_outputs(self, parts: ModelParts) -> Tensor:
        assert self.drift_batch is not None and self.drift_index is not None
        return block_outputs(parts, self.drift_batch, self.drift_index, self.config.autocast_dtype)

    def _run_safely(self, step: int) -> DepthTrace | None:
        """Run the probe; on failure retry once with half the batch, then stop probing."""
        assert self.probe is not None, "ProbeSession.setup() must run before probing"
        try:
            return self.probe.run(step)
        except Exception as error:  # the training run must outlive any probe failure
            _release_cached_memory()
            first_error = error
        self.raise_alert(
            _probe_alert(
                step, f"probe failed ({first_error!r}); retrying with half the probe batch"
            )
        )
        try:
            neutral = self.probe.neutral_batch
            halved = SpinalProbe(
                self.probe.model,
                _half(self.probe.batch),
                self.config,
                None if neutral is None else _half(neutral),
            )
            trace = halved.run(step)
        except Exception as error:  # as above: never let the probe end training
            _release_cached_memory()
            self.disabled = True
            self.raise_alert(
                _probe_alert(step, f"probe failed again ({error!r}); probing is off for this run")
            )
            return None
        self.probe = halved
        return trace


def _half(batch: ProbeBatch) -> ProbeBatch:
    rows = batch.input_ids.shape[0] // 2
    if rows == 0:
        raise ValueError("the probe batch has a single row and cannot be halved")
    return ProbeBatch(batch.input_ids[:rows], batch.attention_mask[:rows])


def _probe_alert(step: int, message: str) -> Alert:
    return Alert(
        step=step,
        level="warning",
        rule="probe_failed",
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
    if neutral is None or neutral.next_token_nll is None or has_language(reference):
        return None
    vocabulary = neutral.metadata.get("vocab_size")
    chance = "unknown"
    if isinstance(vocabulary, int) and vocabulary > 1:
        chance = f"{math.log(vocabulary):.2f}"
    return (
        f"the reference predicts the neutral texts little better than chance (next-token NLL "
        f"{neutral.next_token_nll:.2f} nats against ln V = {chance}); language_drift and "
        "trace_departure are off for this run. Pass neutral_texts= in the model's language, or "
        "expect only the log rules and non_finite on a random-initialised model"
    )


def _stored_reference(entry: dict[str, Any]) -> Tensor | None:
    """The drift reference a state points at (file) or holds (base64); ``None``, with a
    warning, when its file is gone or changed: the next drift probe measures a new one."""
    if "file" not in entry:
        return decode_activations(entry)
    try:
        return load_activations(entry["file"], entry["sha256"])
    except (FileNotFoundError, ValueError) as error:
        logger.warning("spinal-callback: %s; drift is measured against a new reference", error)
        return None


def _tokens_fingerprint(batch: ProbeBatch, token_index: Tensor) -> str:
    """Hash of the probe's token ids, mask and chosen tokens: stored drift references are
    comparable only when it matches."""
    digest = hashlib.sha256()
    for tensor in (batch.input_ids, batch.attention_mask, token_index):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _failures_logged(what: str, consequence: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # a missing reference or drift must not end training
        _release_cached_memory()
        logger.exception("spinal-callback: the %s failed; %s", what, consequence)
