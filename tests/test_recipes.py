"""The offline recipes train for real, and the synthetic task is what it says it is."""

from __future__ import annotations

from pathlib import Path

from recipes import lightning_dpo, trl_dpo
from spinal_callback.preference_data import WORDS, make_preference_pairs, train_eval_split


def test_chosen_repeats_the_prompts_last_word_and_rejected_does_not() -> None:
    for pair in make_preference_pairs(200, seed=3):
        last = pair["prompt"].split()[-1]
        assert pair["chosen"] == f" {last}"
        assert pair["rejected"].strip() in WORDS and pair["rejected"].strip() != last


def test_pairs_are_deterministic_per_seed() -> None:
    assert make_preference_pairs(50, seed=1) == make_preference_pairs(50, seed=1)
    assert make_preference_pairs(50, seed=1) != make_preference_pairs(50, seed=2)


def test_held_out_pairs_never_appear_in_training() -> None:
    train, held_out = train_eval_split(train_count=512, eval_count=64)
    seen = {tuple(row.values()) for row in train}
    assert len(held_out) == 64 and not any(tuple(row.values()) in seen for row in held_out)


def test_trl_recipe_learns_the_preference_with_the_callback_on(tmp_path: Path) -> None:
    args = trl_dpo.parse_args(
        ["--steps", "150", "--every-n-steps", "50", "--output-dir", str(tmp_path)]
    )
    metrics = trl_dpo.run(args)
    assert metrics["rewards/accuracies"] > 0.85
    assert metrics["eval_rewards/accuracies"] > 0.85
    assert metrics["spinal/alerts"] == 0
    assert any((tmp_path / "runs" / "spinal").glob("events.out.tfevents.*"))


def test_lightning_recipe_learns_the_preference(tmp_path: Path) -> None:
    args = lightning_dpo.parse_args(
        ["--steps", "150", "--no-spinal", "--output-dir", str(tmp_path)]
    )
    metrics = lightning_dpo.run(args)
    assert metrics["eval_rewards/accuracies"] > 0.85
