"""Run folders as the callback writes them, made without training: what the SPINAL tab reads.

``write_run`` uses the package's own writers (``TraceHistory``, ``EventLog``, ``RunFiles``'s
reference file), so the files have exactly the callback's format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from spinal_callback.monitor.alerts import Alert
from spinal_callback.outputs.event_log import DEFAULT_NAME, EventLog
from spinal_callback.outputs.history import TraceHistory
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.trace import DepthTrace
from spinal_callback.training.run_files import REFERENCE_STEM

RUN_ID = "run-under-test"
NUM_BLOCKS = 30
VOCAB = 49152


def synthetic_trace(
    step: int,
    layers: list[int],
    shift: float = 0.0,
    neutral_nll: float | None = 2.5,
    probe: str = "probe",
) -> DepthTrace:
    """A trace of ``layers`` whose scores move with ``shift`` and differ per block; with
    ``neutral_nll``, a neutral trace of that next-token NLL (nats)."""
    count = len(layers)
    contraction = torch.tensor([2.0 + 0.3 * i + shift * (1 + 0.1 * i) for i in range(count)])
    transport = torch.tensor([0.05 + 0.01 * i + 0.02 * shift for i in range(count - 1)])

    def make(nll: float | None) -> DepthTrace:
        return DepthTrace(
            step=step,
            layers=list(layers),
            num_blocks=NUM_BLOCKS,
            contraction=contraction.clone(),
            transport=transport.clone(),
            contraction_status=torch.zeros(count, dtype=torch.int8),
            summary={name: 0.1 for name in RAMP_SUMMARY_NAMES},
            measure="hellinger",
            model_fingerprint="model",
            probe_fingerprint=probe,
            metadata={"vocab_size": VOCAB},
            lens_entropy=torch.full((count,), 4.0 - shift),
            next_token_nll=nll,
        )

    trace = make(3.0)
    trace.neutral = None if neutral_nll is None else make(neutral_nll + shift)
    return trace


def write_run(
    folder: Path,
    layers: list[int] | None = None,
    steps: tuple[int, ...] = (0, 10, 20, 30, 40),
    alerts: tuple[Alert, ...] = (),
    records: tuple[Alert, ...] = (),
    neutral_nll: float | None = 2.5,
    reference: bool = True,
) -> Path:
    """A run folder with a trace per step of ``steps`` (each a little further from the
    reference), the event log's ``alerts`` then ``records``, and the reference trace."""
    layers = list(range(20, 30)) if layers is None else layers
    folder.mkdir(parents=True, exist_ok=True)
    history = TraceHistory(run_id=RUN_ID)
    history.open(folder / "spinal_traces.jsonl")
    for step in steps:
        history.append(synthetic_trace(step, layers, shift=step / 100, neutral_nll=neutral_nll))
    log = EventLog(folder / DEFAULT_NAME)
    for alert in (*alerts, *records):
        log.append(alert, RUN_ID)
    if reference:
        trace = synthetic_trace(0, layers, neutral_nll=neutral_nll)
        payload = {"run": RUN_ID, "trace": trace.to_dict()}
        (folder / f"{REFERENCE_STEM}.json").write_text(json.dumps(payload), encoding="utf-8")
    return folder


def alert(step: int, level: str, rule: str, message: str = "it moved") -> Alert:
    return Alert(step, level, rule, f"spinal/{rule}", 1.0, 0.5, message)


def stop_record(step: int, cause: Alert, checkpoint: str | None, resume_step: int | None) -> Alert:
    """A ``training_stopped`` record as ``StopLedger`` writes it."""
    details = {
        "cause_rule": cause.rule,
        "cause_level": cause.level,
        "cause_step": cause.step,
        "first_warning_step": cause.step,
        "resume_from": checkpoint,
        "resume_step": resume_step,
        "advice": "Resume from it.",
    }
    return Alert(
        step, cause.level, "training_stopped", "spinal/stop", math.nan, math.nan, "stopped",
        details=details,
    )  # fmt: skip
