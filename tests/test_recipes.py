"""The synthetic preference task is what it says it is, and the offline recipes train for real."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import PreTrainedTokenizerFast

from recipes import lightning_dpo, trl_dpo
from spinal_callback.preference_data import (
    TOKENIZER_VOCAB_SIZE,
    WORDS,
    held_out_pairs,
    make_preference_pairs,
    tokenizer_corpus,
    train_eval_split,
)
from spinal_callback.tiny import build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """The recipes set torch's thread count for the whole process; put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)


def test_chosen_repeats_the_prompts_last_word_and_rejected_does_not() -> None:
    for pair in make_preference_pairs(200, seed=3):
        last = pair["prompt"].split()[-1]
        assert pair["prompt"].startswith("say: ")
        assert pair["chosen"] == f" {last}"
        assert pair["rejected"].strip() in WORDS and pair["rejected"].strip() != last


def test_pairs_are_deterministic_per_seed() -> None:
    assert make_preference_pairs(50, seed=1) == make_preference_pairs(50, seed=1)
    assert make_preference_pairs(50, seed=1) != make_preference_pairs(50, seed=2)


def test_held_out_prompts_never_appear_in_training_and_are_distinct() -> None:
    train, held_out = train_eval_split(train_count=512, eval_count=64)
    held_out_prompts = [row["prompt"] for row in held_out]
    assert len(held_out) == 64 and len(set(held_out_prompts)) == 64
    assert not set(held_out_prompts) & {row["prompt"] for row in train}


def test_split_is_deterministic_per_seed() -> None:
    first, second = train_eval_split(64, 16, seed=5), train_eval_split(64, 16, seed=5)
    assert [list(part) for part in first] == [list(part) for part in second]


def test_held_out_pairs_fail_clearly_when_every_prompt_is_excluded() -> None:
    every_prompt = {pair["prompt"] for pair in make_preference_pairs(20_000, seed=0)}
    with pytest.raises(ValueError, match="unseen in training"):
        held_out_pairs(8, seed=1, exclude_prompts=every_prompt, max_draws=200)


def test_every_task_word_is_one_token(task_tokenizer: PreTrainedTokenizerFast) -> None:
    for word in WORDS:
        assert len(task_tokenizer.tokenize(f" {word}")) == 1, word


def test_collate_masks_exactly_the_reply_tokens(task_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = make_preference_pairs(4, seed=0)
    batch = lightning_dpo.collate_pairs(task_tokenizer, rows)
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_ids"].shape == batch["chosen_ids"].shape
        for i, row in enumerate(rows):
            reply = batch[f"{side}_ids"][i][batch[f"{side}_response"][i].bool()]
            assert task_tokenizer.decode(reply) == row[side]
        assert (batch[f"{side}_response"] <= batch[f"{side}_attention"]).all()


def test_dpo_loss_is_ln2_while_policy_equals_reference(
    task_tokenizer: PreTrainedTokenizerFast,
) -> None:
    model = build_tiny_model("llama", vocab_size=len(task_tokenizer), hidden=64, layers=4)
    module = lightning_dpo.DPOModule(model, task_tokenizer)
    batch = lightning_dpo.collate_pairs(task_tokenizer, make_preference_pairs(8, seed=0))
    loss, margins = lightning_dpo.dpo_loss(*module._sequence_logps(batch), beta=0.2)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert torch.allclose(margins, torch.zeros(8), atol=1e-5)


def test_dpo_module_keeps_the_reference_frozen_in_eval_mode(
    task_tokenizer: PreTrainedTokenizerFast,
) -> None:
    model = build_tiny_model("llama", vocab_size=len(task_tokenizer), hidden=64, layers=2)
    module = lightning_dpo.DPOModule(model, task_tokenizer).train()
    assert module.model.training and not module.reference.training
    assert not any(p.requires_grad for p in module.reference.parameters())


def test_trl_recipe_learns_the_preference(tmp_path: Path) -> None:
    args = trl_dpo.parse_args(["--steps", "150", "--no-spinal", "--output-dir", str(tmp_path)])
    metrics = trl_dpo.run(args)
    assert metrics["loss"] < 0.5 * metrics["first/loss"]
    assert metrics["rewards/accuracies"] > 0.9
    assert metrics["eval_rewards/accuracies"] > 0.9
    assert metrics["eval_rewards/margins"] > 0


def test_trl_recipe_learns_the_preference_with_lora(tmp_path: Path) -> None:
    args = trl_dpo.parse_args(
        ["--steps", "100", "--lora", "--no-spinal", "--output-dir", str(tmp_path)]
    )
    metrics = trl_dpo.run(args)
    assert metrics["loss"] < metrics["first/loss"]
    assert metrics["eval_rewards/accuracies"] > 0.9


def test_lightning_recipe_learns_the_preference(tmp_path: Path) -> None:
    args = lightning_dpo.parse_args(
        ["--steps", "150", "--no-spinal", "--output-dir", str(tmp_path)]
    )
    metrics = lightning_dpo.run(args)
    assert metrics["eval/loss"] < 0.5 * math.log(2)
    assert metrics["eval/rewards/accuracies"] > 0.9
    assert metrics["eval/rewards/margins"] > 0
    assert any((tmp_path / "tb").glob("version_*/events.out.tfevents.*"))


@pytest.mark.parametrize("recipe", [trl_dpo, lightning_dpo], ids=["trl", "lightning"])
def test_recipe_prints_the_tensorboard_command_and_a_summary(
    recipe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--steps", "10", "--eval-steps", "5", "--no-spinal", "--output-dir", str(tmp_path)]
    assert recipe.main(argv) == 0
    output = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in output
    assert "held-out rewards/accuracies" in output


def tensorboard_scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar written under ``root`` (all event-file directories), as (step, value)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for directory in sorted({path.parent for path in root.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars


@pytest.mark.parametrize("recipe", [trl_dpo, lightning_dpo], ids=["trl", "lightning"])
def test_recipe_probes_the_run_with_the_callback_on(recipe: ModuleType, tmp_path: Path) -> None:
    args = recipe.parse_args(
        ["--steps", "40", "--every-n-steps", "20", "--output-dir", str(tmp_path)]
    )
    metrics = recipe.run(args)
    written = tensorboard_scalars(tmp_path)
    slope = sorted(written["spinal/ramp/contraction_slope"])
    assert [step for step, _ in slope if step > 0] == [20, 40]
    assert slope[-1][1] == pytest.approx(metrics["spinal/contraction_slope"])
    assert {f"spinal/contraction/L{i:02d}" for i in range(4)} <= set(written)
    alert_levels = [level for _, level in written["spinal/alert_level"]]
    assert (max(alert_levels) > 0) == (metrics["spinal/alerts"] > 0)


def test_recipes_import_no_integration_without_the_callback() -> None:
    code = (
        "import sys; import recipes.trl_dpo, recipes.lightning_dpo; "
        "assert not [m for m in sys.modules if m.startswith('spinal_callback.integrations')]"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
