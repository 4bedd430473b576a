"""spinal-callback: late-layer depth traces of a language model during DPO alignment."""

from spinal_callback.config import SpinalConfig
from spinal_callback.metrics import ContractionStatus, contraction_score, transport_score
from spinal_callback.model_access import ModelAccessError, resolve_model_parts
from spinal_callback.probe import ProbeBatch, SpinalProbe, late_band
from spinal_callback.trace import DepthTrace, DepthTraceFormatError

__all__ = [
    "ContractionStatus",
    "DepthTrace",
    "DepthTraceFormatError",
    "ModelAccessError",
    "ProbeBatch",
    "SpinalConfig",
    "SpinalProbe",
    "contraction_score",
    "late_band",
    "resolve_model_parts",
    "transport_score",
]

__version__ = "0.1.0"
