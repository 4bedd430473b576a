"""spinal-callback: late-layer depth traces of a language model during DPO alignment.

The package is layered; each layer imports only from those below it (ARCHITECTURE.md):

- ``config``: ``SpinalConfig``, every knob, read by every layer;
- ``probe``: the measurement (scores, the depth trace, the probe, model plumbing, drift);
- ``monitor``: the decision (alerts, ``RampMonitor`` and its rules);
- ``outputs``: what is shown and recorded (TensorBoard, the event log, the trace history);
- ``training``: the framework-free ``Runner`` and its parts;
- ``integrations``: the TRL/Hugging Face and Lightning callbacks;
- ``tools``: the ``spinal`` command line (audit, localize) and its reports;
- ``demos``: tiny models and synthetic preference tasks for demos and tests.

The callbacks are imported lazily (``spinal_callback.SpinalTrainerCallback`` loads transformers,
``spinal_callback.SpinalCallback`` loads Lightning), so ``import spinal_callback`` stays light.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.outputs.event_log import EventLog
from spinal_callback.probe.metrics import ContractionStatus, contraction_score, transport_score
from spinal_callback.probe.model_access import ModelAccessError, resolve_model_parts
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe, late_band
from spinal_callback.probe.trace import DepthTrace, DepthTraceFormatError

_LAZY = {
    "SpinalTrainerCallback": "spinal_callback.integrations.transformers",
    "run_first": "spinal_callback.integrations.transformers",
    "SpinalCallback": "spinal_callback.integrations.lightning",
}

MOVED_MODULES = {
    "spinal_callback.metrics": "spinal_callback.probe.metrics",
    "spinal_callback.trace": "spinal_callback.probe.trace",
    "spinal_callback.texts": "spinal_callback.probe.texts",
    "spinal_callback.probe_batch": "spinal_callback.probe.batch",
    "spinal_callback.model_access": "spinal_callback.probe.model_access",
    "spinal_callback.loading": "spinal_callback.probe.loading",
    "spinal_callback.drift": "spinal_callback.probe.drift",
    "spinal_callback.detector": "spinal_callback.monitor.ramp_monitor",
    "spinal_callback.events": "spinal_callback.outputs.event_log",
    "spinal_callback.tensorboard": "spinal_callback.outputs.tensorboard",
    "spinal_callback.runner": "spinal_callback.training.runner",
    "spinal_callback.cli": "spinal_callback.tools.cli",
    "spinal_callback.localize": "spinal_callback.tools.localize",
    "spinal_callback.pairs": "spinal_callback.tools.pairs",
    "spinal_callback.tiny": "spinal_callback.demos.tiny",
    "spinal_callback.preference_data": "spinal_callback.demos.preference_data",
}
"""Where the public modules of the flat layout (up to 0.1.0) went; the old names still import."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an import of a ``MOVED_MODULES`` name with the module at its new place."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The module ran at its new place already."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spinal_callback' has no attribute {name!r}")


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

__all__ = [
    "Alert",
    "AlertLevel",
    "ContractionStatus",
    "DepthTrace",
    "DepthTraceFormatError",
    "EventLog",
    "ModelAccessError",
    "ProbeBatch",
    "RampMonitor",
    "SpinalCallback",
    "SpinalConfig",
    "SpinalProbe",
    "SpinalTrainerCallback",
    "contraction_score",
    "late_band",
    "resolve_model_parts",
    "run_first",
    "transport_score",
]

__version__ = "0.1.0"
