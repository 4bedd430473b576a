"""The benchmark's labelled runs: slow conditions build their data and schedules as documented,
and a failure is called from outcomes that hold for ``PERSIST_STEPS``, at any cadence; the
catches the automatic cadence lost are sorted by when it saw the failure."""

from __future__ import annotations

import random

import pytest

from bench.cadence_compare import caught, lost_kind
from bench.chat_data import DEGRADATIONS, INSTRUCTIONS, degrade
from bench.dpo_runs import CONDITIONS, SLOW_CONDITIONS, RunRecord, RunSpec, Subject, lengthened
from bench.dpo_runs import run_data as build_run_data
from bench.early_warning import failure_step

SUBJECT = Subject("llama-4", "llama", layers=4, steps=20, batch_size=4)


def spec(condition: str) -> RunSpec:
    return RunSpec(SUBJECT, "copy", condition, 0, "trl")


def run_data(condition: str):
    return build_run_data(spec(condition), tokenizer=None)


def test_slow_conditions_run_twice_as_long_with_outcomes_every_two_steps() -> None:
    for name in SLOW_CONDITIONS:
        assert spec(name).steps == 2 * SUBJECT.steps
        assert spec(name).outcome_every == 2
    assert spec("healthy").steps == SUBJECT.steps and spec("healthy").outcome_every == 10
    assert spec("healthy_long").steps == 4 * SUBJECT.steps


def test_slow_ramp_rises_linearly_from_the_healthy_rate_to_the_high_rate() -> None:
    ramp = CONDITIONS["slow_ramp"]
    rates = [ramp.learning_rate(SUBJECT, step, 100) for step in (0, 50, 100, 150)]
    healthy, high = SUBJECT.learning_rate, SUBJECT.high_learning_rate
    assert rates == pytest.approx([healthy, (healthy + high) / 2, high, high])


def test_over_optimisation_repeats_the_same_64_pairs_for_the_whole_run() -> None:
    data = run_data("over_optimisation")
    assert len(data.train) == spec("over_optimisation").steps * SUBJECT.batch_size
    assert len({row["prompt"] for row in data.train}) == 64
    assert data.train[0] == data.train[64]


def test_rising_noise_flips_few_labels_early_and_many_late() -> None:
    clean = run_data("healthy_long").train
    noisy = run_data("rising_noise").train
    flipped = [a["chosen"] != b["chosen"] for a, b in zip(clean, noisy, strict=False)]
    quarter = len(flipped) // 4
    first, last = sum(flipped[:quarter]) / quarter, sum(flipped[-quarter:]) / quarter
    assert first < 0.15 and 0.4 < last < 0.7


def test_length_bias_lengthens_only_the_chosen_replies_more_and_more() -> None:
    clean = run_data("healthy_long").train
    biased = run_data("length_bias").train
    assert biased[0]["chosen"] == clean[0]["chosen"]
    assert all(b["rejected"] == c["rejected"] for b, c in zip(biased, clean, strict=False))
    assert len(biased[-1]["chosen"].split()) > len(biased[0]["chosen"].split()) + 8
    assert lengthened(" a b c .", 2) == " a b c c c ."
    assert lengthened(" river", 2) == " river river river"


def record(evals: list[tuple[int, float, float]]) -> RunRecord:
    return RunRecord(
        spec={"key": "k"},
        evals=[
            {
                "step": s,
                "accuracy": a,
                "perplexity_ratio": p,
                "neutral_nll": 1.0,
                "has_language": 1.0,
            }
            for s, a, p in evals
        ],
    )


def test_a_failure_must_hold_for_ten_steps_at_a_two_step_cadence() -> None:
    blip = [(s, 0.5, 3.0 if s in (20, 22) else 1.0) for s in range(0, 60, 2)]
    assert failure_step(record(blip), None) is None
    lasting = [(s, 0.5, 3.0 if s >= 30 else 1.0) for s in range(0, 60, 2)]
    assert failure_step(record(lasting), None) == 30


def test_at_the_ten_step_cadence_two_evaluations_in_a_row_are_a_failure() -> None:
    evals = [(0, 0.5, 1.0), (10, 0.8, 1.0), (20, 0.5, 1.0), (30, 0.55, 1.0), (40, 0.8, 1.0)]
    assert failure_step(record(evals), None) == 20


def test_a_collapse_counts_only_after_the_preference_was_learned() -> None:
    evals = [(s, 0.4, 1.0) for s in range(0, 40, 2)] + [(40, 0.8, 1.0), (42, 0.8, 1.0)]
    assert failure_step(record(evals), None) is None


def test_the_chat_data_has_over_200_distinct_instructions_and_four_degradations() -> None:
    assert len(INSTRUCTIONS) >= 200 and len(set(INSTRUCTIONS)) == len(INSTRUCTIONS)
    reply = "Water evaporates from the sea. It forms clouds. Rain falls on land. Rivers flow back."
    rng = random.Random(0)
    degraded = {
        kind: degrade(reply, kind, "Another answer entirely.", rng) for kind in DEGRADATIONS
    }
    assert all(text != reply for text in degraded.values())
    assert degraded["other_answer"] == "Another answer entirely."
    assert sorted(degraded["shuffled"].split()) == sorted(reply.split())
    assert reply.startswith(degraded["cut_off"]) and len(degraded["cut_off"]) < len(reply)
    loop = degraded["repetition"].split()
    assert loop[: len(loop) // 2] == loop[len(loop) // 2 :] or len(set(loop)) < len(loop) // 2


def scored_row(alert: int | None, failure: int | None) -> dict:
    return {
        "key": "k",
        "intended_failing": failure is not None,
        "failure_step": failure,
        "first_alert": {"spinal, critical": alert},
    }


@pytest.mark.parametrize(
    ("auto_alert", "kind"), [(40, "seen at its next probe"), (80, "later"), (None, "never")]
)
def test_a_catch_the_automatic_cadence_lost_is_sorted_by_when_it_was_seen(
    auto_alert: int | None, kind: str
) -> None:
    fixed = scored_row(alert=30, failure=35)  # caught 5 steps ahead
    auto = scored_row(alert=auto_alert, failure=35)  # lost: alerted after the failure, or never
    probes = [0, 10, 40, 80]  # the automatic run's first look after step 30 was at 40
    assert caught(fixed, "spinal, critical") and not caught(auto, "spinal, critical")
    assert lost_kind(fixed, auto, probes, "spinal, critical") == kind
