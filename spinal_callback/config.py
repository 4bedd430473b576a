"""SpinalConfig: every knob of the probe, the monitor and the callbacks, as plain types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from spinal_callback.metrics import MIN_SPECTRUM_TOKENS

TRANSPORT_MEASURES = ("hellinger", "fisher_rao", "js")
SPECTRUM_DTYPES = ("float32", "float64")
AUTOCAST_DTYPES = ("bfloat16", "float16")
STOP_LEVELS = ("critical", "warning")


@dataclass(frozen=True)
class SpinalConfig:
    """Configuration shared by the probe, the ramp monitor and the training callbacks.

    Every field is a plain type (int, float, str, list, None) so that YAML and ``LightningCLI``
    can build it. Ranges are checked at construction; a bad value raises ``ValueError`` naming
    the field, the value and what is accepted.

    Probe and scores:
        late_layers: block indices to trace (negative indices count from the end), or ``None``
            for the default late band: the last ``ceil(L/3)`` blocks, at least 4, at most ``L``.
        spectrum_tokens: valid tokens subsampled (fixed per probe) for the contraction spectrum.
        transport_tokens: valid tokens subsampled for the logit-lens transport.
        max_probe_length: tokens kept per probe text (longer texts are truncated).
        transport: ``"hellinger"`` (default), ``"fisher_rao"`` or ``"js"``.
        tail_low, tail_high: the contraction fit uses eigenvalue ranks
            ``k in [ceil(tail_low * r), floor(tail_high * r)]``.
        spectrum_dtype: precision of the Gram matrix and its eigenvalues.
        lens_chunk_mib: upper bound, in MiB, on the float32 logit-lens block held at once.
        autocast_dtype: ``"bfloat16"``/``"float16"`` to run the probe forward under autocast,
            ``None`` to run in the model's own dtype (an enclosing autocast is still honoured).
        seed: seed of the token subsamples.
        blocks_path, final_norm_path, head_path: attribute paths (relative to the unwrapped
            ``*ForCausalLM``) of the decoder blocks, final norm and unembedding, for
            architectures the automatic lookup cannot resolve.

    Training (used by the callbacks and the monitor):
        every_n_steps: probe cadence in optimizer steps.
        patience: probes (or logs) in a row a rule's critical level needs.
        stop_on: ``"critical"``, ``"warning"`` or ``None`` (never stop).
        event_log: path of the JSONL event log (``None``: ``<log_dir>/spinal_events.jsonl``).
        image_every: write the depth-trace heatmap every this many probes.
        perplexity_warning, perplexity_critical: the ``language_drift`` rule: perplexity of the
            neutral probe texts as a multiple of the reference's (``None`` turns a level off).
        departure_warning, departure_critical: the ``trace_departure`` rule: how far the
            neutral texts' depth trace has moved from the reference's, as a multiple of the
            larger of its early pace and the probe's resolution (``None`` turns a level off).
            Critical is off by default: in the benchmark's dev split a critical departure never
            stopped a failing run earlier than ``language_drift`` did, and on the test split it
            stopped two healthy runs whose language was intact.
        reversal_margin: the ``preference_reversal`` rule: two logged DPO losses in a row above
            ``ln 2 * (1 + reversal_margin)`` (ln 2 is every DPO run's step-0 loss) are
            critical; ``None`` turns it off.
        loss_window, loss_spike_z: the ``loss_spike`` rule on the trainer's logged loss: a loss
            more than ``loss_spike_z`` noise units (the window's log-to-log spread) above the
            median of the latest 3 of the previous ``loss_window`` logs is info at once and
            critical after ``patience`` consecutive logs; ``loss_spike_z=None`` turns it off (a
            non-finite loss is always critical).
        neutral_probe: also probe neutral text (the callbacks' ``neutral_texts``, else
            ``texts.DEFAULT_NEUTRAL_TEXTS``) in the same forward; the trace of text the run does
            not train on is what tells damage from learning.
        drift_every: every this many probes, also chart how far each block's output has moved
            from the reference's on the probe batch (``spinal/drift/L{ii}``); ``None``: off.
    """

    late_layers: list[int] | None = None
    spectrum_tokens: int = 512
    transport_tokens: int = 256
    max_probe_length: int = 256
    transport: str = "hellinger"
    tail_low: float = 0.05
    tail_high: float = 0.7
    spectrum_dtype: str = "float64"
    lens_chunk_mib: int = 64
    autocast_dtype: str | None = None
    seed: int = 0
    blocks_path: str | None = None
    final_norm_path: str | None = None
    head_path: str | None = None
    every_n_steps: int = 50
    patience: int = 2
    stop_on: str | None = "critical"
    event_log: str | None = None
    image_every: int = 10
    perplexity_warning: float | None = 1.3
    perplexity_critical: float | None = 1.6
    departure_warning: float | None = 3.0
    departure_critical: float | None = None
    reversal_margin: float | None = 0.5
    loss_window: int = 10
    loss_spike_z: float | None = 8.0
    drift_every: int | None = None
    neutral_probe: bool = True

    def __post_init__(self) -> None:
        if self.late_layers is not None:
            self._check_late_layers(self.late_layers)
            object.__setattr__(self, "late_layers", [int(i) for i in self.late_layers])
        _check_int("spectrum_tokens", self.spectrum_tokens, minimum=MIN_SPECTRUM_TOKENS)
        _check_int("transport_tokens", self.transport_tokens, minimum=1)
        _check_int("max_probe_length", self.max_probe_length, minimum=1)
        _check_int("every_n_steps", self.every_n_steps, minimum=1)
        _check_int("patience", self.patience, minimum=1)
        _check_int("image_every", self.image_every, minimum=1)
        _check_int("lens_chunk_mib", self.lens_chunk_mib, minimum=1)
        _check_choice("transport", self.transport, TRANSPORT_MEASURES)
        _check_choice("spectrum_dtype", self.spectrum_dtype, SPECTRUM_DTYPES)
        if self.autocast_dtype is not None:
            _check_choice("autocast_dtype", self.autocast_dtype, AUTOCAST_DTYPES)
        if self.stop_on is not None:
            _check_choice("stop_on", self.stop_on, STOP_LEVELS)
        _check_levels("perplexity", self.perplexity_warning, self.perplexity_critical, 1.0)
        _check_levels("departure", self.departure_warning, self.departure_critical, 0.0)
        if self.reversal_margin is not None and not self.reversal_margin >= 0:
            raise ValueError(
                f"SpinalConfig.reversal_margin must be >= 0 or None, got {self.reversal_margin!r}"
            )
        _check_int("loss_window", self.loss_window, minimum=3)
        if self.drift_every is not None:
            _check_int("drift_every", self.drift_every, minimum=1)
        if self.loss_spike_z is not None and not self.loss_spike_z > 0:
            raise ValueError(
                f"SpinalConfig.loss_spike_z must be > 0 or None, got {self.loss_spike_z!r}"
            )
        if not 0.0 < self.tail_low < self.tail_high <= 1.0:
            raise ValueError(
                f"SpinalConfig needs 0 < tail_low < tail_high <= 1, got tail_low={self.tail_low} "
                f"and tail_high={self.tail_high}; the defaults are 0.05 and 0.7."
            )

    @staticmethod
    def _check_late_layers(late_layers: Sequence[int]) -> None:
        if isinstance(late_layers, (str, bytes)) or not isinstance(late_layers, Sequence):
            raise ValueError(
                f"SpinalConfig.late_layers must be a list of block indices or None, "
                f"got {late_layers!r}"
            )
        if len(late_layers) < 2:
            raise ValueError(
                f"SpinalConfig.late_layers needs at least 2 blocks (transport is measured "
                f"between adjacent blocks), got {list(late_layers)}"
            )
        if any(isinstance(i, bool) or not isinstance(i, int) for i in late_layers):
            raise ValueError(f"SpinalConfig.late_layers must hold ints, got {list(late_layers)}")

    def with_overrides(self, **overrides: Any) -> SpinalConfig:
        """Return a copy with the given fields replaced; unknown names raise ``TypeError``."""
        unknown = sorted(set(overrides) - set(self.to_dict()))
        if unknown:
            raise TypeError(
                f"unknown SpinalConfig field(s) {unknown}; valid fields: {sorted(self.to_dict())}"
            )
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return asdict(self)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SpinalConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_levels(name: str, warning: float | None, critical: float | None, above: float) -> None:
    """``above < warning <= critical``; either level may be ``None`` (off)."""
    levels = [v for v in (warning, critical) if v is not None]
    if any(not v > above for v in levels) or (
        warning is not None and critical is not None and critical < warning
    ):
        raise ValueError(
            f"SpinalConfig needs {above} < {name}_warning <= {name}_critical (either may be None "
            f"to turn it off), got {warning} and {critical}"
        )


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"SpinalConfig.{name} must be one of {list(choices)}, got {value!r}")
