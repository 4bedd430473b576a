"""The monitor's early-warning rules, one small object each (see ``base.AlertRule``)."""

from spinal_callback.monitor.rules.base import AlertRule, Streak
from spinal_callback.monitor.rules.collapse import TaskCollapse
from spinal_callback.monitor.rules.departure import TraceDeparture
from spinal_callback.monitor.rules.language import LanguageDrift
from spinal_callback.monitor.rules.loss_spike import LossSpike
from spinal_callback.monitor.rules.non_finite import NonFinite
from spinal_callback.monitor.rules.preference import PreferenceReversal

DEFAULT_RULES: tuple[type[AlertRule], ...] = (
    NonFinite,
    LanguageDrift,
    TraceDeparture,
    TaskCollapse,
    PreferenceReversal,
    LossSpike,
)
"""The rules a ``RampMonitor`` runs unless told otherwise, in the order they are scored."""

__all__ = [
    "DEFAULT_RULES",
    "AlertRule",
    "LanguageDrift",
    "LossSpike",
    "NonFinite",
    "PreferenceReversal",
    "Streak",
    "TaskCollapse",
    "TraceDeparture",
]
