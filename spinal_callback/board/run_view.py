"""What the SPINAL tab shows of one run, read from the files the callback writes in its log dir.

A run is a folder that holds ``spinal_traces.jsonl`` (the trace history of rank 0) and, by
default, ``spinal_events.jsonl`` (the event log) and ``spinal_reference.json`` (the reference
trace). ``find_runs`` lists them under a TensorBoard log dir; ``run_view`` turns one into plain
JSON types: the run's status, its alerts and recoveries, each late block's scores at every probe
with the reference beside them, and the neutral-text health or why it is not watched.

Nothing here writes, and a torn or partial line (a live run mid-write) is skipped, so the tab
reads a live run as safely as a finished one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from spinal_callback.monitor.alerts import AlertLevel
from spinal_callback.monitor.rules.departure import departure
from spinal_callback.monitor.rules.language import has_language, perplexity_ratio
from spinal_callback.outputs.event_log import DEFAULT_NAME, RESUMED, current_records
from spinal_callback.outputs.history import FILE_STEM
from spinal_callback.probe.trace import DepthTrace, block_name
from spinal_callback.training.recovery import RECOVERED
from spinal_callback.training.run_files import REFERENCE_STEM
from spinal_callback.training.stop_ledger import TRAINING_STOPPED

TRACES_FILE = f"{FILE_STEM}.jsonl"
EVENTS_FILE = DEFAULT_NAME
REFERENCE_FILE = f"{REFERENCE_STEM}.json"
MAX_DEPTH = 6
"""How many folders below the log dir ``find_runs`` looks (TRL: ``runs/<date>/spinal``)."""
RECORDS = {TRAINING_STOPPED, RECOVERED, RESUMED}
"""Event-log rules that are records of what the run did, not alerts of a rule."""


def find_runs(logdir: str | os.PathLike[str], max_depth: int = MAX_DEPTH) -> list[str]:
    """The folders under ``logdir`` (itself included) that hold a trace history, as paths
    relative to ``logdir`` with ``/`` separators (``"."`` for ``logdir`` itself), sorted.
    Hidden folders and symbolic links are not followed."""
    root = Path(logdir)
    found = []
    for folder in _folders(root, max_depth):
        if (folder / TRACES_FILE).is_file():
            relative = folder.relative_to(root).as_posix()
            found.append(relative)
    return sorted(found)


def _folders(root: Path, depth: int) -> Iterator[Path]:
    if not root.is_dir():
        return
    yield root
    if depth <= 0:
        return
    try:
        children = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError:
        return
    for child in children:
        if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
            continue
        yield from _folders(Path(child.path), depth - 1)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line; torn, partial or invalid lines are skipped
    (a live run may be writing the last one). A missing file reads as none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.readlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def current_traces(lines: Sequence[dict[str, Any]]) -> tuple[str | None, list[DepthTrace]]:
    """The run id and the traces of the last segment in a trace history (a resume copies the
    checkpoint's traces into a new segment, so the last one is the run as it stands)."""
    valid = [line for line in lines if isinstance(line.get("trace"), dict)]
    if not valid:
        return None, []
    run, segment = valid[-1].get("run"), valid[-1].get("segment")
    traces = []
    for line in valid:
        if line.get("run") == run and line.get("segment") == segment:
            try:
                traces.append(DepthTrace.from_dict(line["trace"]))
            except (KeyError, TypeError, ValueError):
                continue
    if traces and traces[-1].step < max(trace.step for trace in traces):
        traces.sort(key=lambda trace: trace.step)
    return run, _since_last_restart(traces)


def _since_last_restart(traces: list[DepthTrace]) -> list[DepthTrace]:
    """The traces of the last probe fingerprint: a probe change restarts the baseline, and
    earlier traces no longer compare."""
    if not traces:
        return traces
    fingerprint = traces[-1].probe_fingerprint
    start = len(traces)
    while start > 0 and traces[start - 1].probe_fingerprint == fingerprint:
        start -= 1
    return traces[start:]


def read_reference(folder: Path, run: str | None) -> tuple[DepthTrace | None, Path]:
    """The run's reference trace (``spinal_reference.json``; ``None`` when it is missing,
    unreadable or another run's) and its event log: where the reference file says (the
    callback's ``event_log=``, a ``.jsonl`` file), else ``spinal_events.jsonl`` beside it."""
    default = folder / EVENTS_FILE
    try:
        data = json.loads((folder / REFERENCE_FILE).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or (run is not None and data.get("run") != run):
            return None, default
        log = data.get("event_log")
        events = Path(log) if isinstance(log, str) and log.endswith(".jsonl") else default
        return DepthTrace.from_dict(data["trace"]), events
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None, default


def run_view(folder: str | os.PathLike[str], name: str = "") -> dict[str, Any]:
    """Everything the SPINAL tab draws of the run in ``folder``, as JSON types.

    Keys: ``run`` (``name``), ``run_id``, ``status`` (see ``run_status``), ``alerts`` and
    ``recoveries`` (event-log records of this run, step order), ``blocks`` (``"L20"``, ...),
    ``steps`` (probe steps), ``contraction`` and ``transport`` (per block a list over the
    probes; the deepest block has no transport, ``None``), ``reference`` (per block its
    reference values, or ``None``), ``neutral`` (see ``neutral_view``), ``updated`` (Unix time
    of the newest file), ``event_log`` (the path read). Non-finite numbers are ``None``
    (strict JSON).
    """
    path = Path(folder)
    run, traces = current_traces(read_jsonl(path / TRACES_FILE))
    reference, events = read_reference(path, run)
    records = [
        record
        for record in current_records(read_jsonl(events))
        if run is None or record.get("run", run) == run
    ]
    last = traces[-1] if traces else None
    blocks = [] if last is None else [block_name(layer, last.num_blocks) for layer in last.layers]
    comparable = [trace for trace in traces if last is not None and trace.layers == last.layers]
    alerts = [_alert(record) for record in records if record.get("rule") not in RECORDS]
    recoveries = [_recovery(record) for record in records if record.get("rule") == RECOVERED]
    view = {
        "run": name,
        "run_id": run,
        "status": run_status(records, comparable, alerts),
        "alerts": alerts,
        "recoveries": recoveries,
        "blocks": blocks,
        "steps": [trace.step for trace in comparable],
        "contraction": _per_block(comparable, "contraction", len(blocks)),
        "transport": _per_block(comparable, "transport", len(blocks)),
        "reference": _reference_view(reference, last),
        "neutral": neutral_view(comparable, reference),
        "updated": _updated(path),
        "event_log": str(events),
    }
    return _finite(view)


def run_status(
    records: Sequence[dict[str, Any]],
    traces: Sequence[DepthTrace],
    alerts: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The run's state in one line and its facts.

    ``state`` is ``"stopped"`` (a ``training_stopped`` record), else ``"critical"`` or
    ``"warning"`` (the highest alert level of the run), else ``"healthy"``. ``headline`` is the
    line the tab shows first (e.g. "Stopped at step 40 by critical language_drift");
    ``detail`` the next (where to resume from, the recoveries, the last probe). ``step``,
    ``rule``, ``level``, ``checkpoint`` and ``checkpoint_step`` are its facts (``None`` when
    not known).
    """
    probes = len(traces)
    last_step = traces[-1].step if traces else None
    watched = (
        f"{probes} probe{'s' if probes != 1 else ''} up to step {last_step}"
        if probes
        else "no probe yet"
    )
    recoveries = [record for record in records if record.get("rule") == RECOVERED]
    recovered = (
        f"; recovered {len(recoveries)} time{'s' if len(recoveries) != 1 else ''} (last at step "
        f"{recoveries[-1].get('step')})"
        if recoveries
        else ""
    )
    stops = [record for record in records if record.get("rule") == TRAINING_STOPPED]
    status: dict[str, Any] = {
        "state": "healthy",
        "step": None,
        "rule": None,
        "level": None,
        "checkpoint": None,
        "checkpoint_step": None,
        "probes": probes,
        "last_step": last_step,
    }
    if stops:
        return {**status, **_stopped(stops, alerts, watched + recovered)}
    worst = max(alerts, key=lambda alert: (_severity(alert), -alert["step"]), default=None)
    if worst is None or _severity(worst) < AlertLevel.WARNING:
        notes = f"; {len(alerts)} info note{'s' if len(alerts) != 1 else ''}" if alerts else ""
        return {
            **status,
            "headline": "Healthy: no warning",
            "detail": f"{watched}{notes}{recovered}",
        }
    level = worst["level"]
    count = sum(1 for alert in alerts if alert["level"] == level)
    return {
        **status,
        "state": level,
        "step": worst["step"],
        "rule": worst["rule"],
        "level": level,
        "headline": f"{level.capitalize()} at step {worst['step']} by {worst['rule']}",
        "detail": f"{count} {level} alert{'s' if count != 1 else ''}; {watched}{recovered}",
    }


def _stopped(
    stops: Sequence[dict[str, Any]], alerts: Sequence[dict[str, Any]], watched: str
) -> dict[str, Any]:
    """The status of a stopped run, from its stop records (the last one with a checkpoint)."""
    stop = stops[0]
    facts: dict[str, Any] = {}
    for record in stops:
        details = record.get("details")
        if isinstance(details, dict):
            facts.update({key: value for key, value in details.items() if value is not None})
    rule, level = facts.get("cause_rule"), facts.get("cause_level")
    if rule is None:
        causes = [alert for alert in alerts if alert["step"] <= stop.get("step", math.inf)]
        cause = max(causes, key=lambda alert: (_severity(alert), alert["step"]), default=None)
        rule = None if cause is None else cause["rule"]
        level = stop.get("level") if cause is None else cause["level"]
    by = f" by {level} {rule}" if rule is not None else ""
    checkpoint, checkpoint_step = facts.get("resume_from"), facts.get("resume_step")
    if checkpoint is not None:
        resume = f"Resume from {checkpoint} (step {checkpoint_step})"
        first = facts.get("first_warning_step")
        if first is not None:
            resume += f", the last checkpoint saved before the first warning (step {first})"
    elif facts.get("checkpoint") is not None:
        resume = (
            f"No checkpoint before the trouble; the stop's checkpoint is {facts['checkpoint']} "
            f"(step {facts.get('checkpoint_step')})"
        )
    else:
        resume = str(facts.get("advice") or "No checkpoint was saved before the stop.")
    return {
        "state": "stopped",
        "step": stop.get("step"),
        "rule": rule,
        "level": level,
        "checkpoint": checkpoint if checkpoint is not None else facts.get("checkpoint"),
        "checkpoint_step": (
            checkpoint_step if checkpoint is not None else facts.get("checkpoint_step")
        ),
        "headline": f"Stopped at step {stop.get('step')}{by}",
        "detail": f"{resume.rstrip('.')}. {watched[0].upper()}{watched[1:]}.",
    }


def neutral_view(traces: Sequence[DepthTrace], reference: DepthTrace | None) -> dict[str, Any]:
    """The neutral-text health per probe: ``perplexity_ratio`` (a multiple of the reference's)
    and ``departure`` (relative change of the late-layer trace), with ``shown`` False and a
    one-line ``reason`` when ``language_drift`` and ``trace_departure`` do not watch this run."""
    empty: dict[str, Any] = {"shown": False, "perplexity_ratio": [], "departure": []}
    if reference is None:
        return {**empty, "reason": "no reference trace in this run's folder yet"}
    if reference.neutral is None:
        return {
            **empty,
            "reason": "no neutral texts are probed (neutral_texts=None): language_drift and "
            "trace_departure are off",
        }
    if not has_language(reference):
        return {
            **empty,
            "reason": "the reference predicts the neutral texts no better than chance (a "
            "model with no language yet): language_drift and trace_departure are off; "
            "task_collapse and the log rules watch",
        }
    view: dict[str, Any] = {
        "shown": True,
        "reason": None,
        "steps": [],
        "perplexity_ratio": [],
        "departure": [],
    }
    for trace in traces:
        if trace.neutral is not None:
            view["steps"].append(trace.step)
            view["perplexity_ratio"].append(perplexity_ratio(trace, reference))
            view["departure"].append(departure(trace.neutral, reference.neutral))
    return view


def _reference_view(reference: DepthTrace | None, last: DepthTrace | None) -> Any:
    """Per block, the reference's contraction and transport (``None`` without a reference of
    the same late blocks)."""
    if reference is None or last is None or reference.layers != last.layers:
        return None
    return {
        "step": reference.step,
        "contraction": reference.contraction.tolist(),
        "transport": [*reference.transport.tolist(), None],
    }


def _per_block(traces: Sequence[DepthTrace], score: str, blocks: int) -> list[Any]:
    """``[block][probe]`` values of ``score``; the deepest block's transport is ``None``."""
    columns = [getattr(trace, score).tolist() for trace in traces]
    rows: list[Any] = []
    for block in range(blocks):
        if score == "transport" and block == blocks - 1:
            rows.append(None)
        else:
            rows.append([column[block] for column in columns])
    return rows


def _alert(record: dict[str, Any]) -> dict[str, Any]:
    level = str(record.get("level", "info"))
    return {
        "step": int(record.get("step", 0)),
        "level": level if level in ("info", "warning", "critical") else "info",
        "rule": str(record.get("rule", "")),
        "metric": str(record.get("metric", "")),
        "value": record.get("value"),
        "threshold": record.get("threshold"),
        "message": str(record.get("message", "")),
    }


def _recovery(record: dict[str, Any]) -> dict[str, Any]:
    details = record.get("details")
    if not isinstance(details, dict):
        details = {}
    return {"step": int(record.get("step", 0)), "message": str(record.get("message", ""))} | {
        key: details.get(key)
        for key in ("rewound_to", "steps_lost", "learning_rate", "cause", "attempt")
    }


def _severity(alert: dict[str, Any]) -> int:
    return int(AlertLevel.parse(alert["level"]))


def _updated(folder: Path) -> float | None:
    times = []
    for name in (TRACES_FILE, EVENTS_FILE, REFERENCE_FILE):
        try:
            times.append((folder / name).stat().st_mtime)
        except OSError:
            continue
    return max(times, default=None)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
