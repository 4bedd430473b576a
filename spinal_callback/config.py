"""SpinalConfig: every knob of the probe, the monitor and the callbacks, as plain types."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

TAIL_LOW = 0.05
TAIL_HIGH = 0.7
"""The default tail band of a layer's activation spectrum, as fractions of its rank: the
contraction is the decay exponent of the eigenvalues between them (``probe.metrics``)."""
MIN_SPECTRUM_TOKENS = 16
"""The fewest valid tokens a probe may have: the tail band needs a spectrum of some rank."""
TransportMeasure = Literal["hellinger", "fisher_rao", "js"]
SpectrumDtype = Literal["float32", "float64"]
AutocastDtype = Literal["bfloat16", "float16"]
LensDtype = Literal["auto", "bfloat16", "native"]
StopLevel = Literal["critical", "warning"]
OnCritical = Literal["stop", "recover"]
ProbeCadence = int | Literal["auto"]
"""``every_n_steps``: an interval in optimizer steps, or ``"auto"`` (set by ``overhead_budget``)."""
TRANSPORT_MEASURES: tuple[str, ...] = get_args(TransportMeasure)
MIN_PROBE_LENGTH = 8
"""The fewest tokens ``max_probe_length`` may keep per probe text. The scores compare rows
token by token, and a row of one or two tokens is the BOS token and the first word, which texts
share ("The ..."): the rows coincide and the contraction reads 0 whatever the model. 8 tokens
keep a few words of every text, so the rows differ and each adds several tokens to the
spectrum."""


@dataclass(frozen=True)
class SpinalConfig:
    """Configuration shared by the probe, the ramp monitor and the training callbacks.

    Every field is a plain type (int, float, str, list, None) so that YAML and ``LightningCLI``
    can build it. Types and ranges are checked at construction, and every error names the field,
    the value and what is accepted:

    - a value of the wrong type raises ``TypeError``; a string is converted where the reading is
      unambiguous: ``"50"`` for an int field, ``"0.1"`` or ``"1e-3"`` for a float field (``"1.5"``
      for an int field is an error, and a bool is never a number);
    - a value of the right type outside its range, a NaN or infinite float, or a blank string
      raises ``ValueError``;
    - ``None`` is accepted by the fields typed ``... | None`` only. The strings ``"none"`` and
      ``"null"`` are not read as ``None`` (``blocks_path="none"`` could be a real attribute
      path); write ``null`` in YAML or ``None`` in Python;
    - ``event_log`` also takes an ``os.PathLike`` and stores it as ``str``; ``late_layers`` takes
      a list or tuple of ints and stores a list.

    Probe and scores:
        late_layers: block indices to trace (negative indices count from the end), or ``None``
            for the default late band: the last ``ceil(L/3)`` blocks, at least 4, at most ``L``.
        spectrum_tokens: valid tokens subsampled (fixed per probe) for the contraction spectrum.
            The tail exponent of a subsample is biased against the all-token value (by 20% at
            1024 of 2918 tokens on a 135M model), so the default 8192 takes every token of a
            default probe (32 prompts of at most 256 tokens). Its cost is ``tokens x d^2`` per
            late block, a few percent of the forward.
        transport_tokens: the most valid tokens (a fixed random sample) the logit lens takes,
            the probe's largest cost (``tokens x late blocks x vocabulary x d`` multiply-adds).
        transport_tolerance: how far the transport may be from its all-token value. Token by
            token the transport spreads widely (standard deviation 0.15-0.24 on a 135M model;
            near 0 on a random-initialised one), so a fixed count is either too few for a real
            model (a mean over 256 tokens was 0.03 off) or wasted on an easy one. The first
            probe takes the sample's tokens, 128 at a time and at least 256, until every
            transport mean's standard error (with the finite-population correction) is at most
            a third of this, and later probes take the same tokens. ``None``: all
            ``transport_tokens``. Under ZeRO-3 the ranks settle on the count together.
        max_probe_length: tokens kept per probe text (longer texts are truncated), at least
            ``MIN_PROBE_LENGTH`` (8): shorter rows are the BOS token and a word or two, the
            same for most texts, and measure nothing.
        transport: ``"hellinger"`` (default), ``"fisher_rao"`` or ``"js"``.
        tail_low, tail_high: the contraction fit uses eigenvalue ranks
            ``k in [ceil(tail_low * r), floor(tail_high * r)]``.
        spectrum_dtype: precision of the Gram matrix and its eigenvalues.
        lens_chunk_mib: upper bound, in MiB, on the float32 logit-lens logits held at once (on a
            CPU a tile of them is at most ``lens.CPU_TILE_MIB``, so that it stays in cache).
        lens_dtype: precision of the logit lens's unembedding matrix product, the probe's largest
            cost. ``"native"``: the forward's own (the head's dtype, or the probe's or an
            enclosing autocast); ``"bfloat16"``: under bfloat16 autocast (products accumulate in
            float32; the softmax and the scores stay float32); ``"auto"`` (default):
            ``"bfloat16"`` when the forward is float32 on a CPU with native bfloat16 matrix
            instructions (AVX-512 BF16 or AMX), where it is about 2.7x faster and moved
            transport by under 0.001 on a 135M model, else ``"native"`` (an AVX-512 CPU
            without them emulates bfloat16, 4x slower than float32).
        autocast_dtype: ``"bfloat16"``/``"float16"`` to run the probe forward under autocast,
            ``None`` to run in the model's own dtype (an enclosing autocast is still honoured).
        seed: seed of the token subsamples, an int in ``[0, 2**63)``.
        blocks_path, final_norm_path, head_path: attribute paths (relative to the unwrapped
            ``*ForCausalLM``) of the decoder blocks, final norm and unembedding, for
            architectures the automatic lookup cannot resolve.

    Training (used by the callbacks and the monitor):
        every_n_steps: probe cadence in optimizer steps, or ``"auto"``: as often as
            ``overhead_budget`` allows, measured on the run (``training/cadence.py``).
        overhead_budget: with ``every_n_steps="auto"``, the share of the run's wall time the
            probes may take (0.01 = 1%).
        auto_min_steps, auto_max_steps: with ``every_n_steps="auto"``, the interval stays in
            this range. The floor is also the step of the first probe after the reference,
            where ``trace_departure`` sets its early pace; the ceiling bounds how many steps
            late a failure can be seen.
        patience: probes (or logs) in a row a rule's critical level needs.
        stop_on: ``"critical"``, ``"warning"`` or ``None`` (never stop).
        on_critical: what an alert at the ``stop_on`` level does: ``"stop"`` training (with a
            checkpoint), or ``"recover"``: rewind the trainable weights, optimizer, scheduler,
            gradient scaler and rules to the last good state (host memory), multiply the
            learning rate by ``recover_lr_factor`` for the rest of the run, and go on from the
            next batch; it stops as with ``"stop"`` after ``max_recoveries``, or when the rule
            is one a gentler step cannot fix (``training.recovery.UNRECOVERABLE_RULES``).
        recover_lr_factor: the learning-rate multiplier of each recovery, in (0, 1). The default
            0.1 was chosen on the benchmark's dev split (0.5, 0.2 and 0.1 tried: runs at 30x
            the healthy rate ended healthy most often, and lost the fewest steps, at 0.1).
        max_recoveries: recoveries allowed in one run before a stop.
        recover_snapshot_dir: keep the recovery snapshots in files in this directory (one pair
            per rank, removed at train end) instead of host memory, for trainable parameters
            and optimizer state too large for two host copies; ``None``: host memory.
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
        departure_corroborated: a ``trace_departure`` warning is critical when the neutral
            perplexity is past ``perplexity_warning`` at the same probe (two views of the same
            text agree). Off by default: on the benchmark's dev split it made 16 of 29 slow
            failures critical by their failure step instead of 12, but it also stopped 2 of 12
            healthy-setting runs four times the usual length, whose language was eroding
            slowly (1.3x perplexity).
        collapse_warning, collapse_critical: the ``task_collapse`` rule, only on a model that
            predicts its task prompts no better than chance (a random-initialised one, which
            the neutral rules cannot watch): the share of the reference's late-layer lens
            entropy lost, or of its contraction changed, per optimizer step between two probes
            (``None`` turns a level off).
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
    spectrum_tokens: int = 8192
    transport_tokens: int = 2048
    transport_tolerance: float | None = 0.01
    max_probe_length: int = 256
    transport: TransportMeasure = "hellinger"
    tail_low: float = TAIL_LOW
    tail_high: float = TAIL_HIGH
    spectrum_dtype: SpectrumDtype = "float64"
    lens_chunk_mib: int = 64
    lens_dtype: LensDtype = "auto"
    autocast_dtype: AutocastDtype | None = None
    seed: int = 0
    blocks_path: str | None = None
    final_norm_path: str | None = None
    head_path: str | None = None
    every_n_steps: ProbeCadence = 50
    overhead_budget: float = 0.01
    auto_min_steps: int = 10
    auto_max_steps: int = 100
    patience: int = 2
    stop_on: StopLevel | None = "critical"
    on_critical: OnCritical = "stop"
    recover_lr_factor: float = 0.1
    max_recoveries: int = 3
    recover_snapshot_dir: str | None = None
    event_log: str | None = None
    image_every: int = 10
    perplexity_warning: float | None = 1.3
    perplexity_critical: float | None = 1.6
    departure_warning: float | None = 3.0
    departure_critical: float | None = None
    departure_corroborated: bool = False
    collapse_warning: float | None = 0.04
    collapse_critical: float | None = 0.05
    reversal_margin: float | None = 0.5
    loss_window: int = 10
    loss_spike_z: float | None = 8.0
    drift_every: int | None = None
    neutral_probe: bool = True

    def __post_init__(self) -> None:
        for item in fields(self):
            kind, optional = _FIELD_KINDS[item.name]
            value = _parse_field(item.name, getattr(self, item.name), kind, optional)
            object.__setattr__(self, item.name, value)
        if self.late_layers is not None and len(self.late_layers) < 2:
            raise ValueError(
                f"SpinalConfig.late_layers needs at least 2 blocks (transport is measured "
                f"between adjacent blocks), got {self.late_layers}"
            )
        _check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        _check_int("spectrum_tokens", self.spectrum_tokens, minimum=MIN_SPECTRUM_TOKENS)
        _check_int("transport_tokens", self.transport_tokens, minimum=1)
        if self.transport_tolerance is not None and not self.transport_tolerance > 0:
            raise ValueError(
                "SpinalConfig.transport_tolerance must be > 0 or None (every transport token), "
                f"got {self.transport_tolerance!r}"
            )
        if self.max_probe_length < MIN_PROBE_LENGTH:
            raise ValueError(
                f"SpinalConfig.max_probe_length must be an int >= {MIN_PROBE_LENGTH}, got "
                f"{self.max_probe_length!r}: rows that short are the BOS token and a word or two, "
                "the same for most texts, so the probe measures nothing. Keep the default 256 "
                f"or pass max_probe_length >= {MIN_PROBE_LENGTH}"
            )
        if self.every_n_steps != "auto":
            _check_int("every_n_steps", self.every_n_steps, minimum=1)
        if not 0.0 < self.overhead_budget < 1.0:
            raise ValueError(
                "SpinalConfig.overhead_budget must be in (0, 1): the share of the run's time the "
                f"probes may take (0.01 = 1%), got {self.overhead_budget!r}"
            )
        _check_int("auto_min_steps", self.auto_min_steps, minimum=1)
        _check_int("auto_max_steps", self.auto_max_steps, minimum=self.auto_min_steps)
        _check_int("patience", self.patience, minimum=1)
        _check_int("max_recoveries", self.max_recoveries, minimum=1)
        if not 0.0 < self.recover_lr_factor < 1.0:
            raise ValueError(
                "SpinalConfig.recover_lr_factor must be in (0, 1): each recovery multiplies the "
                f"learning rate by it, got {self.recover_lr_factor!r}"
            )
        if self.on_critical == "recover" and self.stop_on is None:
            raise ValueError(
                "SpinalConfig.on_critical='recover' needs stop_on ('critical' or 'warning'): the "
                "alert level that triggers a recovery; stop_on=None never acts"
            )
        _check_int("image_every", self.image_every, minimum=1)
        _check_int("lens_chunk_mib", self.lens_chunk_mib, minimum=1)
        _check_levels("perplexity", self.perplexity_warning, self.perplexity_critical, 1.0)
        _check_levels("departure", self.departure_warning, self.departure_critical, 0.0)
        _check_levels("collapse", self.collapse_warning, self.collapse_critical, 0.0)
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
                f"and tail_high={self.tail_high}; the defaults are {TAIL_LOW} and {TAIL_HIGH}."
            )

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


def _check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> None:
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"SpinalConfig.{name} must be an int >= {minimum}{upper}, got {value!r}")


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


class _WrongType(Exception):
    """Raised by a ``_Kind.parse`` for a value it cannot read; ``_parse_field`` words the error."""


class _NotAChoice(ValueError):
    """Raised by a ``Literal`` field's parse for a string that is none of its choices."""


class _Kind(NamedTuple):
    """How to read one field type: ``parse`` returns the stored value, raises ``_WrongType``
    for a value of the wrong type and ``ValueError(reason)`` for a wrong value of the right
    type; ``description`` says what is accepted, for the error."""

    parse: Callable[[object], object]
    description: str


def _parse_int(value: object) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _WrongType from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _WrongType
    return int(value)


def _parse_float(value: object) -> float:
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _WrongType from None
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _WrongType
    else:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    if not math.isfinite(number):
        raise ValueError("must be finite")
    return number


def _parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise _WrongType
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _parse_path(value: object) -> str:
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    return _parse_str(path)


def _parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _WrongType
    return value


def _parse_int_list(value: object) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise _WrongType
    return [_parse_int(item) for item in value]


_KINDS: dict[Any, _Kind] = {
    int: _Kind(_parse_int, "an int (a string of digits such as '50' is read as one)"),
    float: _Kind(_parse_float, "a number (a string such as '0.1' or '1e-3' is read as one)"),
    str: _Kind(_parse_str, "a string"),
    bool: _Kind(_parse_bool, "True or False"),
    list[int]: _Kind(_parse_int_list, "a list of ints"),
}


# Fields whose annotation alone does not say how to read them.
def _parse_cadence(value: object) -> int | str:
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    return _parse_int(value)


_FIELD_KIND_OVERRIDES = {
    "event_log": _Kind(_parse_path, "a path (str or os.PathLike)"),
    "every_n_steps": _Kind(
        _parse_cadence, "an int (a string of digits such as '50' is read as one) or 'auto'"
    ),
}


def _choice(choices: tuple[str, ...]) -> _Kind:
    """A ``Literal`` field: one of ``choices`` (a string of the right type, else ``ValueError``)."""

    def parse(value: object) -> str:
        if _parse_str(value) not in choices:
            raise _NotAChoice
        return str(value)

    return _Kind(parse, f"one of {list(choices)}")


def _field_kinds() -> dict[str, tuple[_Kind, bool]]:
    """Each field's ``_Kind`` and whether it accepts ``None``, read from its annotation (a
    ``Literal`` lists its choices: they are stated once, in the type)."""
    kinds = {}
    for name, hint in get_type_hints(SpinalConfig).items():
        arguments = get_args(hint)
        optional = type(None) in arguments and get_origin(hint) is not Literal
        base = next(a for a in arguments if a is not type(None)) if optional else hint
        if name in _FIELD_KIND_OVERRIDES:
            kinds[name] = (_FIELD_KIND_OVERRIDES[name], optional)
            continue
        kind = _choice(get_args(base)) if get_origin(base) is Literal else _KINDS[base]
        kinds[name] = (kind, optional)
    return kinds


_FIELD_KINDS = _field_kinds()


def _parse_field(name: str, value: object, kind: _Kind, optional: bool) -> object:
    """``value`` read as the field's type; ``TypeError``/``ValueError`` naming field and value."""
    accepted = kind.description + (" or None" if optional else "")
    if value is None and optional:
        return None
    try:
        return kind.parse(value)
    except _WrongType:
        hint = ""
        if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
            hint = "; write null in YAML or None in Python to leave it unset"
        raise TypeError(
            f"SpinalConfig.{name} must be {accepted}, got {value!r} ({type(value).__name__}){hint}"
        ) from None
    except _NotAChoice:
        raise ValueError(f"SpinalConfig.{name} must be {accepted}, got {value!r}") from None
    except ValueError as error:
        raise ValueError(
            f"SpinalConfig.{name} {error}: expected {accepted}, got {value!r}"
        ) from None
