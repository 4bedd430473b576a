"""RampMonitor and its rules on synthetic trace and log streams: what fires, when, and state."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.monitor.rules import DEFAULT_RULES, AlertRule, LanguageDrift, NonFinite
from spinal_callback.monitor.rules.departure import departure
from spinal_callback.monitor.rules.loss_spike import MIN_WINDOW
from spinal_callback.probe.trace import DepthTrace

SUMMARY = {
    "contraction_slope": 0.8,
    "transport_mean": 0.2,
    "transport_slope": -0.1,
    "jaggedness": 0.05,
    "tortuosity": 1.5,
    "lens_entropy": 4.0,
}
CONTRACTION = (1.0, 1.1, 1.2, 1.3)
ENTROPY = (4.0, 3.8, 3.6, 3.4)
REFERENCE_NLL = 2.0
VOCAB = 1000


def trace(
    step: int,
    contraction: tuple[float, ...] = CONTRACTION,
    entropy: tuple[float, ...] = ENTROPY,
    nll: float = REFERENCE_NLL,
    vocab: int = VOCAB,
    neutral: bool = True,
) -> DepthTrace:
    """A trace whose neutral group has the given contraction, lens entropy and NLL (the task
    group keeps the reference's values)."""
    inner = DepthTrace(
        step=step,
        layers=[4, 5, 6, 7],
        num_blocks=8,
        contraction=torch.tensor(contraction),
        transport=torch.tensor([0.2, 0.2, 0.2]),
        contraction_status=torch.zeros(4, dtype=torch.int8),
        summary=dict(SUMMARY),
        measure="hellinger",
        model_fingerprint="m",
        probe_fingerprint="p",
        metadata={"vocab_size": vocab},
        lens_entropy=torch.tensor(entropy),
        next_token_nll=nll,
    )
    outer = DepthTrace(**{**inner.__dict__, "contraction": torch.tensor(CONTRACTION)})
    outer.lens_entropy = torch.tensor(ENTROPY)
    outer.neutral = inner if neutral else None
    if not all(math.isfinite(c) for c in contraction):
        outer.summary = {**SUMMARY, "contraction_slope": math.nan}
    return outer


def scaled(step: int, factor: float) -> DepthTrace:
    """Neutral contraction and entropy moved by ``factor`` (relative) from the reference."""
    return trace(
        step,
        contraction=tuple(c * (1 + factor) for c in CONTRACTION),
        entropy=tuple(h * (1 - factor) for h in ENTROPY),
    )


def monitor(**overrides: object) -> RampMonitor:
    watched = RampMonitor(SpinalConfig(**overrides))  # type: ignore[arg-type]
    watched.set_reference(trace(0))
    return watched


def levels(alerts: list) -> list[tuple[int, str, str]]:
    return [(a.step, a.level, a.rule) for a in alerts]


def feed(watched: RampMonitor, traces: list[DepthTrace]) -> list:
    return [alert for t in traces for alert in watched.update(t)]


# ---- language_drift --------------------------------------------------------------------------


def test_neutral_perplexity_multiples_raise_warning_then_critical_at_once() -> None:
    watched = monitor(perplexity_warning=1.3, perplexity_critical=1.6)
    nlls = [REFERENCE_NLL + math.log(m) for m in (1.05, 1.4, 1.7)]
    alerts = feed(watched, [trace(10 * (i + 1), nll=n) for i, n in enumerate(nlls)])
    drift = [a for a in alerts if a.rule == "language_drift"]
    assert [(a.step, a.level) for a in drift] == [(20, "warning"), (30, "critical")]
    assert drift[-1].value == pytest.approx(1.7) and drift[-1].threshold == 1.6
    assert drift[-1].metric == "spinal/neutral/perplexity_ratio"
    assert "learning rate" in drift[-1].message


def test_a_reference_without_language_mutes_the_perplexity_rule() -> None:
    rule = LanguageDrift(SpinalConfig())
    rule.calibrate(trace(0, nll=0.9 * math.log(VOCAB)))
    assert rule.score_trace(trace(10, nll=2 * math.log(VOCAB))) == []
    rule.calibrate(trace(0, neutral=False))
    assert rule.score_trace(trace(10, nll=50.0)) == []


def test_a_muted_neutral_probe_is_explained_once_at_setup() -> None:
    from spinal_callback.training.baseline import muted_neutral_rules_note

    note = muted_neutral_rules_note(trace(0, nll=0.9 * math.log(VOCAB)))
    assert note is not None and "language_drift and trace_departure are off" in note
    assert f"{math.log(VOCAB):.2f}" in note
    assert muted_neutral_rules_note(trace(0)) is None
    assert muted_neutral_rules_note(trace(0, neutral=False)) is None


def test_lower_perplexity_than_the_reference_is_not_an_alert() -> None:
    assert feed(monitor(), [trace(10, nll=REFERENCE_NLL - 1.0)]) == []


# ---- trace_departure -------------------------------------------------------------------------


def test_departure_is_relative_and_sign_free() -> None:
    reference = trace(0).neutral
    assert reference is not None
    up = scaled(10, 0.1).neutral
    down = scaled(10, -0.1).neutral
    assert up is not None and down is not None
    assert departure(up, reference) == pytest.approx(0.1)
    assert departure(down, reference) == pytest.approx(0.1)
    assert departure(reference, reference) == 0.0
    bigger = trace(0, contraction=tuple(10 * c for c in CONTRACTION)).neutral
    moved = trace(0, contraction=tuple(11 * c for c in CONTRACTION)).neutral
    assert bigger is not None and moved is not None
    assert departure(moved, bigger) == pytest.approx(0.1)


def test_departure_is_scored_in_units_of_the_early_pace() -> None:
    watched = monitor(departure_warning=3.0, departure_critical=6.0)
    pace = 0.04
    factors = [pace, 2 * pace, 4 * pace, 7 * pace, 2 * pace]
    alerts = feed(watched, [scaled(10 * (i + 1), f) for i, f in enumerate(factors)])
    departure_alerts = [(a.step, a.level) for a in alerts if a.rule == "trace_departure"]
    assert departure_alerts == [(30, "warning"), (40, "critical")]
    assert alerts[-1].value == pytest.approx(7.0) and alerts[-1].threshold == 6.0


def test_a_healthy_trace_that_moves_at_its_early_pace_raises_nothing() -> None:
    rng = random.Random(0)
    factors = [0.01 + 0.0002 * i + rng.gauss(0, 0.001) for i in range(100)]
    watched = monitor()
    assert feed(watched, [scaled(10 * (i + 1), f) for i, f in enumerate(factors)]) == []


def test_the_first_probe_after_the_reference_only_sets_the_pace() -> None:
    watched = monitor(departure_warning=3.0, departure_critical=None)
    far = scaled(10, 0.5)  # 25x the resolution floor: a warning, were it scored
    later = scaled(20, 1.6)  # 3.2x the pace the first probe set
    alerts = [(a.step, a.level, a.value) for a in feed(watched, [far, later])]
    assert alerts == [(20, "warning", pytest.approx(3.2))]


def test_departure_has_a_resolution_floor_so_a_still_start_is_not_its_unit() -> None:
    watched = monitor(departure_warning=3.0, departure_critical=None)
    alerts = feed(watched, [scaled(10, 1e-6), scaled(20, 0.03)])
    assert alerts == []


def moved(step: int, factor: float, perplexity: float) -> DepthTrace:
    """``scaled`` with the neutral perplexity at ``perplexity`` times the reference's."""
    moved_trace = scaled(step, factor)
    assert moved_trace.neutral is not None
    moved_trace.neutral.next_token_nll = REFERENCE_NLL + math.log(perplexity)
    return moved_trace


def test_a_departure_is_critical_when_the_neutral_perplexity_corroborates_it() -> None:
    watched = monitor(perplexity_warning=1.3, departure_warning=3.0, departure_corroborated=True)
    alerts = feed(watched, [moved(10, 0.04, 1.0), moved(20, 0.16, 1.1), moved(30, 0.16, 1.35)])
    departures = [(a.step, a.level) for a in alerts if a.rule == "trace_departure"]
    assert departures == [(20, "warning"), (30, "critical")]
    assert [(a.step, a.level) for a in alerts if a.rule == "language_drift"] == [(30, "warning")]
    critical = next(a for a in alerts if a.level == "critical")
    assert "both views" in critical.message and critical.threshold == 3.0


def test_either_view_alone_is_a_warning_and_corroboration_is_off_by_default() -> None:
    lone = feed(monitor(departure_corroborated=True), [moved(10, 0.04, 1.0), moved(20, 0.04, 1.4)])
    assert [(a.rule, a.level) for a in lone] == [("language_drift", "warning")]
    off = monitor()
    alerts = feed(off, [moved(10, 0.04, 1.0), moved(20, 0.16, 1.4)])
    assert sorted((a.rule, a.level) for a in alerts) == [
        ("language_drift", "warning"),
        ("trace_departure", "warning"),
    ]


# ---- task_collapse ---------------------------------------------------------------------------

CHANCE_NLL = math.log(VOCAB)


def task_trace(
    step: int, entropy: float, contraction: float = 1.0, nll: float = CHANCE_NLL
) -> DepthTrace:
    """A trace whose task group has this mean lens entropy, contraction and NLL (no neutral)."""
    base = trace(step, neutral=False)
    base.lens_entropy = torch.full((4,), entropy)
    base.contraction = torch.full((4,), contraction)
    base.next_token_nll = nll
    return base


def collapse_monitor(reference_nll: float = CHANCE_NLL) -> RampMonitor:
    watched = RampMonitor(SpinalConfig(collapse_warning=0.04, collapse_critical=0.05))
    watched.set_reference(task_trace(0, 6.0, nll=reference_nll))
    return watched


def collapses(alerts: list) -> list[tuple[int, str]]:
    return [(a.step, a.level) for a in alerts if a.rule == "task_collapse"]


def test_a_gradual_fall_of_the_task_entropy_is_learning_and_raises_nothing() -> None:
    watched = collapse_monitor()
    steps = [task_trace(10 * i, 6.0 - 0.6 * i) for i in range(1, 9)]
    assert collapses(feed(watched, steps)) == []


def test_losing_most_of_the_task_entropy_within_one_interval_is_critical() -> None:
    watched = collapse_monitor()
    alerts = feed(watched, [task_trace(10, 5.9), task_trace(20, 3.4), task_trace(30, 0.1)])
    assert collapses(alerts) == [(20, "warning"), (30, "critical")]
    critical = [a for a in alerts if a.rule == "task_collapse"][-1]
    assert critical.value == pytest.approx(3.3 / 6.0 / 10)
    assert critical.metric == "spinal/task/collapse_rate"


def test_the_rate_is_per_optimizer_step_so_a_coarser_cadence_scores_the_same_pace() -> None:
    fine, coarse = collapse_monitor(), collapse_monitor()
    fine_alerts = feed(fine, [task_trace(10, 3.5), task_trace(20, 1.0)])
    coarse_alerts = feed(coarse, [task_trace(20, 1.0)])
    assert [a.value for a in fine_alerts] == pytest.approx([2.5 / 60] * 2)
    assert [a.value for a in coarse_alerts] == pytest.approx([2.5 / 60])


def test_contraction_changing_fast_in_either_direction_counts_too() -> None:
    watched = collapse_monitor()
    alerts = feed(watched, [task_trace(10, 6.0, contraction=1.6), task_trace(20, 6.0, 1.0)])
    assert collapses(alerts) == [(10, "critical"), (20, "critical")]


def test_a_model_that_predicts_its_task_better_than_chance_is_left_to_the_neutral_rules() -> None:
    watched = collapse_monitor(reference_nll=0.3 * CHANCE_NLL)
    assert collapses(feed(watched, [task_trace(10, 0.1)])) == []


def test_prompts_of_random_words_at_chance_do_not_make_a_model_with_language_watched() -> None:
    reference = trace(0)
    reference.next_token_nll = 2 * CHANCE_NLL
    watched = RampMonitor(SpinalConfig(collapse_warning=0.04, collapse_critical=0.05))
    watched.set_reference(reference)
    collapsed = trace(10)
    collapsed.lens_entropy = torch.full((4,), 0.01)
    assert collapses(watched.update(collapsed)) == []


def test_the_collapse_rule_resumes_from_its_state_with_the_last_trace() -> None:
    first = collapse_monitor()
    feed(first, [task_trace(10, 5.9)])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = collapse_monitor()
    resumed.load_state_dict(state)
    assert collapses(resumed.update(task_trace(20, 1.0))) == [(20, "critical")]
    assert collapses(collapse_monitor().update(task_trace(20, 1.0))) == [(20, "warning")]
    assert [a.value for a in resumed.update(task_trace(30, 1.0))] == []


# ---- non_finite ------------------------------------------------------------------------------


def test_a_non_finite_trace_is_critical_at_once_and_once() -> None:
    broken = trace(10, contraction=(1.0, math.nan, 1.2, 1.3))
    broken.contraction = torch.tensor([1.0, math.nan, 1.2, 1.3])
    watched = monitor()
    first = watched.update(broken)
    assert levels(first) == [(10, "critical", "non_finite")]
    assert first[0].layers == [5]
    assert watched.update(broken) == []


def test_a_non_finite_loss_or_reward_log_is_critical_at_once() -> None:
    watched = monitor()
    [nan_loss] = watched.update_logs(3, {"loss": math.nan})
    assert levels([nan_loss]) == [(3, "critical", "non_finite")]
    watched.update_logs(4, {"loss": 0.69})
    [nan_margin] = watched.update_logs(5, {"loss": 0.69, "rewards/margins": math.inf})
    assert nan_margin.metric == "rewards/margins" and "loss scale" in nan_margin.message
    assert watched.update_logs(6, {"grad_norm": math.inf, "loss": 0.69}) == []


# ---- preference_reversal and loss_spike ------------------------------------------------------


def feed_losses(watched: RampMonitor, losses: list[float], start: int = 1) -> list:
    return [
        alert
        for step, loss in enumerate(losses, start=start)
        for alert in watched.update_logs(step, {"loss": loss, "learning_rate": 1e-3})
    ]


def noisy_losses(count: int, level: float = 0.3, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0, 0.02) for _ in range(count)]


def test_a_noisy_training_loss_below_ln2_raises_no_warning_or_critical() -> None:
    assert [a for a in feed_losses(monitor(), noisy_losses(500)) if a.level != "info"] == []


def test_a_loss_that_settles_far_above_ln2_is_a_critical_preference_reversal() -> None:
    watched = monitor(reversal_margin=0.5)
    alerts = feed_losses(watched, [0.69, 0.66, 0.62, 1.2, 1.3, 0.5])
    reversal = [(a.step, a.level) for a in alerts if a.rule == "preference_reversal"]
    assert reversal == [(5, "critical")]
    assert alerts[-1].value == pytest.approx(1.25)
    assert alerts[-1].threshold == pytest.approx(1.5 * math.log(2))
    assert "rejected" in alerts[-1].message


def test_a_broken_run_reverses_from_its_first_logs() -> None:
    alerts = feed_losses(monitor(), [42.0, 40.0])
    assert [(a.step, a.level, a.rule) for a in alerts] == [(2, "critical", "preference_reversal")]


def test_a_loss_near_ln2_is_not_a_reversal() -> None:
    rng = random.Random(2)
    losses = [math.log(2) + rng.gauss(0, 0.05) for _ in range(300)]
    assert [a for a in feed_losses(monitor(), losses) if a.rule == "preference_reversal"] == []


def test_a_lone_loss_spike_is_info_and_a_sustained_one_critical() -> None:
    watched = monitor(patience=2, loss_window=10)
    feed_losses(watched, noisy_losses(30))
    lone = feed_losses(watched, [0.6, 0.3, 0.31], start=31)
    assert [(a.step, a.level, a.rule) for a in lone] == [(31, "info", "loss_spike")]
    feed_losses(watched, noisy_losses(10, seed=1), start=34)
    sustained = feed_losses(watched, [0.6, 0.62], start=44)
    assert [(a.step, a.level) for a in sustained if a.rule == "loss_spike"] == [
        (44, "info"),
        (45, "critical"),
    ]


def test_loss_spike_scores_nothing_until_its_window_is_full() -> None:
    calm = [0.69 - 0.01 * i for i in range(MIN_WINDOW)]
    early = feed_losses(monitor(), [*calm[:-1], 3.0])
    assert [a for a in early if a.rule == "loss_spike"] == []
    full = feed_losses(monitor(), [*calm, 3.0])
    assert [(a.step, a.level, a.rule) for a in full] == [(MIN_WINDOW + 1, "info", "loss_spike")]


def test_non_finite_needs_no_warm_up() -> None:
    watched = RampMonitor(SpinalConfig())
    broken = trace(0, contraction=(1.0, math.nan, 1.2, 1.3))
    broken.contraction = torch.tensor([1.0, math.nan, 1.2, 1.3])
    assert levels(watched.update(broken)) == [(0, "critical", "non_finite")]
    assert levels(watched.update_logs(1, {"loss": math.nan})) == [(1, "critical", "non_finite")]


def test_logs_without_a_training_loss_are_ignored() -> None:
    watched = monitor(patience=1)
    feed_losses(watched, noisy_losses(30))
    assert watched.update_logs(31, {"eval_accuracy": 0.5}) == []
    assert watched.update_logs(31, {"train_loss": 9.0, "train_runtime": 12.0}) == []
    assert watched.update_logs(31, {"loss": "n/a"}) == []  # type: ignore[dict-item]


# ---- the monitor -----------------------------------------------------------------------------


def test_the_first_trace_is_the_reference_when_none_was_set() -> None:
    watched = RampMonitor(SpinalConfig())
    assert watched.update(scaled(0, 0.5)) == []
    assert watched.reference is not None and watched.reference.step == 0
    # The rules were calibrated on it: a probe that did not move from it sets a still pace, and
    # the usual reference's trace, half the first one's entropy away, is then a departure.
    alerts = feed(watched, [scaled(10, 0.5), trace(20)])
    assert levels(alerts) == [(20, "warning", "trace_departure")]


def test_every_default_rule_has_a_distinct_name_and_rules_can_be_chosen() -> None:
    names = [rule.name for rule in DEFAULT_RULES]
    assert len(set(names)) == len(names) == 6
    only = RampMonitor(SpinalConfig(), rules=[NonFinite])
    only.set_reference(trace(0))
    assert only.update(trace(10, nll=REFERENCE_NLL + 5)) == []

    class Twin(AlertRule):
        name = "non_finite"

    with pytest.raises(ValueError, match="distinct names"):
        RampMonitor(SpinalConfig(), rules=[NonFinite, Twin])


def test_state_dict_round_trips_through_json_and_continues_identically() -> None:
    original = monitor(patience=2)
    feed(original, [scaled(10, 0.04), scaled(20, 0.2)])
    feed_losses(original, [*noisy_losses(12), 0.9], start=1)
    restored = RampMonitor(SpinalConfig(patience=2))
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    rest = [scaled(30, 0.3), trace(40, nll=REFERENCE_NLL + 1.0)]
    assert [a.to_dict() | {"time": 0} for a in feed(original, rest)] == [
        a.to_dict() | {"time": 0} for a in feed(restored, rest)
    ]
    assert [a.to_dict() | {"time": 0} for a in feed_losses(original, [0.95], 14)] == [
        a.to_dict() | {"time": 0} for a in feed_losses(restored, [0.95], 14)
    ]


def test_state_from_an_older_monitor_starts_the_rules_afresh_with_a_warning() -> None:
    watched = RampMonitor(SpinalConfig())
    with pytest.warns(UserWarning, match="afresh"):
        watched.load_state_dict({"history": {}, "streak": {}})
    assert watched.reference is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"perplexity_warning": 2.0, "perplexity_critical": 1.5},
        {"perplexity_warning": 0.9},
        {"departure_warning": 0.0},
        {"departure_warning": 5.0, "departure_critical": 4.0},
        {"reversal_margin": -0.1},
        {"loss_spike_z": 0.0},
        {"loss_window": 2},
    ],
)
def test_bad_rule_settings_are_rejected_at_construction(overrides: dict) -> None:
    with pytest.raises(ValueError, match="SpinalConfig"):
        SpinalConfig(**overrides)
