"""The runner's checkpointed state: its format version, and the reading of older versions.

Version 4 (this one) keeps each part under its owner's key, each with its own version where it
has one: ``schedule`` (the runner), ``files`` (``RunFiles``), ``history`` (``TraceHistory``),
``baseline`` (``Baseline``: the reference, stored once, and the rules), ``ledger``
(``StopLedger``) and ``drift`` (``DriftMeter``). Versions 1-3 kept everything at the top level
(version 2 also stored the reference twice, in the runner and in the monitor); ``upgrade_state``
maps them onto version 4, so a checkpoint saved by an older release resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STATE_VERSION = 4


def upgrade_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` in the version-4 layout.

    Raises:
        ValueError: a version newer than this release knows.
    """
    version = int(state.get("version", 0))
    if version > STATE_VERSION:
        raise ValueError(
            f"spinal-callback state version {version} is newer than {STATE_VERSION}; "
            "upgrade spinal-callback to resume this checkpoint"
        )
    if version == STATE_VERSION:
        return dict(state)
    monitor = dict(state.get("monitor") or {})
    reference = state.get("reference", monitor.get("reference"))
    monitor.pop("reference", None)
    return {
        "version": STATE_VERSION,
        "run": state.get("run"),
        "schedule": {
            "last_probe_step": state["last_probe_step"],
            "probes_run": state.get("probes_run", _traces_in(state.get("history"))),
            "worst_level": state.get("worst_level", 0),
            "disabled": state["disabled"],
        },
        "files": {key: state[key] for key in ("directory", "event_log") if state.get(key)},
        "history": state["history"],
        "baseline": {"reference": reference, "monitor": monitor or None},
        "ledger": {
            "first_warning_step": state.get("first_warning_step"),
            "checkpoints": state.get("checkpoints", []),
        },
        "drift": state.get("drift", state.get("drift_reference")),
    }


def _traces_in(history: Any) -> int:
    if isinstance(history, list):
        return len(history)
    if isinstance(history, Mapping) and "traces" in history:
        return len(history["traces"])
    if isinstance(history, Mapping):
        return int(history.get("count", 0)) - int(history.get("from_line", 0))
    return 0


def saved_state(entries: Any, key: str, legacy_key: str) -> Mapping[str, Any] | None:
    """The runner's state among a framework's saved callback states (HF's
    ``TrainerState.stateful_callbacks``): the entry ``key``, else the entry the first releases
    wrote under the callback's class name, ``legacy_key`` (``{"attributes": {"spinal_state":
    ...}}``, possibly in a list); ``None`` when there is neither."""
    if not isinstance(entries, Mapping):
        return None
    saved = entries.get(key)
    if saved is None:
        legacy = entries.get(legacy_key)
        if isinstance(legacy, list):
            legacy = legacy[0] if legacy else None
        saved = (legacy or {}).get("attributes", {}).get("spinal_state")
    return saved or None
