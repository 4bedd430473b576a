"""The synthetic preference task is what it says it is, and the offline recipes train for real."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import PreTrainedTokenizerFast

from recipes import common, lightning_dpo, smollm2, trl_dpo
from spinal_callback.demos.preference_data import (
    TOKENIZER_VOCAB_SIZE,
    WORDS,
    held_out_pairs,
    make_preference_pairs,
    tokenizer_corpus,
    train_eval_split,
)
from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer
from spinal_callback.probe.loading import load_local_model, load_local_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = pytest.mark.parametrize("recipe", [trl_dpo, lightning_dpo], ids=["trl", "lightning"])


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


@RECIPES
def test_recipe_prints_the_tensorboard_command_and_a_summary(
    recipe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--steps", "10", "--eval-steps", "5", "--no-spinal", "--output-dir", str(tmp_path)]
    assert recipe.main(argv) == 0
    output = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in output
    assert "held-out rewards/accuracies" in output


@RECIPES
def test_recipe_saves_the_final_model_and_tokenizer_and_says_where(
    recipe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--steps", "4", "--eval-steps", "4", "--no-spinal", "--output-dir", str(tmp_path)]
    assert recipe.main(argv) == 0
    output = capsys.readouterr().out
    final = tmp_path / "final"
    model, tokenizer = load_local_model(final), load_local_tokenizer(final)
    assert model.config.num_hidden_layers == 4 and len(tokenizer) == model.config.vocab_size
    assert f"final model  {final}" in output
    assert "checkpoints  none" in output


@RECIPES
def test_save_steps_writes_checkpoints_and_the_report_lists_them(
    recipe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--steps", "4", "--eval-steps", "4", "--save-steps", "2", "--no-spinal"]
    assert recipe.main([*argv, "--output-dir", str(tmp_path)]) == 0
    checkpoints = sorted(tmp_path.glob("checkpoint-*")) or sorted(
        (tmp_path / "checkpoints").glob("*.ckpt")
    )
    assert len(checkpoints) == 2
    assert f"checkpoints  2 in {checkpoints[0].parent}" in capsys.readouterr().out


def test_the_report_counts_alerts_in_integers_by_level(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = {
        "steps": 300.0,
        "spinal/step": 300.0,
        "spinal/contraction_slope": -0.25,
        "spinal/alerts": 3.0,
        "spinal/alerts/info": 2.0,
        "spinal/alerts/warning": 1.0,
        "spinal/alerts/critical": 0.0,
    }
    common.print_report("summary.", metrics, {"TensorBoard": "tensorboard --logdir x"}, 300)
    output = capsys.readouterr().out
    assert "Alerts: 3 (0 critical, 1 warning, 2 info)" in output
    assert "Depth trace at the last probe (step 300):" in output
    assert "contraction_slope    -0.250" in output
    assert "3.000" not in output and "alerts 3" not in output
    assert "stopped" not in output


def test_the_report_says_when_the_run_stopped_early(capsys: pytest.CaptureFixture[str]) -> None:
    common.print_report("summary.", {"steps": 20.0}, {"TensorBoard": "x"}, 40)
    assert "Training stopped at step 20 of 40" in capsys.readouterr().out


# ---- options -----------------------------------------------------------------------------------


def options(recipe: ModuleType) -> list[argparse.Action]:
    return [a for a in recipe.build_parser()._actions if a.option_strings and a.dest != "help"]


@RECIPES
def test_every_recipe_option_has_a_help_text(recipe: ModuleType) -> None:
    for action in options(recipe):
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, action


@RECIPES
def test_every_recipe_option_shows_its_default_in_the_help(recipe: ModuleType) -> None:
    parser = recipe.build_parser()
    formatter = parser._get_formatter()
    for action in options(recipe):
        shown = formatter._expand_help(action)
        if action.default is None:
            assert "Default:" in shown, f"{action.dest}: a None default must be explained"
        elif action.default is False:
            assert shown.endswith("(default: off)"), action.dest
        else:
            assert shown.endswith(f"(default: {action.default})"), action.dest
    parser.format_help()  # a stray % in a help text would raise here


@pytest.fixture
def checkpoint(tmp_path: Path) -> str:
    """A directory that passes the recipes' early check of ``--model`` (never loaded)."""
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return str(directory)


@RECIPES
def test_the_tiny_model_trains_at_the_toy_learning_rate(recipe: ModuleType) -> None:
    args = recipe.parse_args([])
    assert args.learning_rate == common.TINY_LEARNING_RATE == 3e-3
    assert args.steps == common.TINY_STEPS and args.threads == 1


@RECIPES
def test_a_pretrained_checkpoint_gets_a_fine_tuning_learning_rate(
    recipe: ModuleType, checkpoint: str
) -> None:
    args = recipe.parse_args(["--model", checkpoint])
    assert args.learning_rate == common.PRETRAINED_LEARNING_RATE == 5e-7
    assert args.threads is None


def test_lora_on_a_pretrained_checkpoint_gets_a_ten_times_higher_rate(checkpoint: str) -> None:
    args = trl_dpo.parse_args(["--model", checkpoint, "--lora"])
    assert args.learning_rate == common.LORA_LEARNING_RATE == 5e-6


def test_an_explicit_learning_rate_wins_and_a_destructive_one_is_warned_about(
    checkpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="recipes.common"):
        assert trl_dpo.parse_args(["--model", checkpoint, "--learning-rate", "1e-6"])
        assert not caplog.records
        args = trl_dpo.parse_args(["--model", checkpoint, "--learning-rate", "3e-3"])
    assert args.learning_rate == 3e-3
    assert "will likely destroy it" in caplog.text


@RECIPES
def test_a_model_path_without_a_checkpoint_is_refused_before_anything_loads(
    recipe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        recipe.parse_args(["--model", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2
    assert "is not a local checkpoint directory (no config.json)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
        (["--learning-rate", "0"], "--learning-rate must be positive"),
    ],
)
def test_out_of_range_options_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        trl_dpo.parse_args(argv)
    assert message in capsys.readouterr().err


# ---- --pairs -----------------------------------------------------------------------------------


def write_pairs(path: Path, rows: Sequence[object]) -> str:
    path.write_text(
        "".join(f"{row if isinstance(row, str) else json.dumps(row)}\n" for row in rows)
    )
    return str(path)


GOOD = {"prompt": "say: apple river", "chosen": " river", "rejected": " lamp"}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ({"prompt": "say: a b", "chosen": " b"}, r"pairs.jsonl:3 lacks \['rejected'\]"),
        ({**GOOD, "chosen": 7}, r"pairs.jsonl:3: 'chosen' must be a string, got int"),
        ({**GOOD, "rejected": ""}, r"pairs.jsonl:3: the 'rejected' reply is empty"),
        ("{not json", r"pairs.jsonl:3 is not JSON"),
        ('["a", "list"]', r"pairs.jsonl:3 must be a JSON object"),
    ],
    ids=["missing-field", "not-a-string", "empty-reply", "not-json", "not-an-object"],
)
@RECIPES
def test_a_bad_pairs_line_is_refused_early_naming_the_line_and_field(
    recipe: ModuleType,
    bad_line: object,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = {**GOOD, "prompt": "say: stone cloud"}
    pairs = write_pairs(tmp_path / "pairs.jsonl", [GOOD, other, bad_line])
    with pytest.raises(SystemExit) as stopped:
        recipe.parse_args(["--pairs", pairs])
    assert stopped.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_missing_pairs_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        trl_dpo.parse_args(["--pairs", str(tmp_path / "absent.jsonl")])
    assert "no pairs file at" in capsys.readouterr().err


def test_pairs_with_a_single_prompt_cannot_be_split_and_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "rejected": " stone"}])
    with pytest.raises(SystemExit):
        trl_dpo.parse_args(["--pairs", pairs])
    assert "at least 2 distinct prompts" in capsys.readouterr().err


def test_the_held_out_split_takes_a_tenth_of_the_pairs_by_whole_prompts() -> None:
    rows = make_preference_pairs(400, seed=2, prompt_words=1)  # 16 prompts, about 25 pairs each
    train, held_out = common.split_pairs(rows, seed=0)
    assert sorted(map(str, train + held_out)) == sorted(map(str, rows))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    largest_prompt = max(sum(r["prompt"] == p["prompt"] for r in rows) for p in rows)
    assert 40 <= len(held_out) < 40 + largest_prompt
    assert common.split_pairs(rows, seed=0) == (train, held_out)
    assert common.split_pairs(rows, seed=1) != (train, held_out)


def test_the_held_out_split_is_capped_and_never_empty() -> None:
    many = make_preference_pairs(5000, seed=0)
    assert len(common.split_pairs(many, seed=0)[1]) <= common.MAX_HELD_OUT + 1
    two = [GOOD, {**GOOD, "prompt": "say: stone cloud"}]
    train, held_out = common.split_pairs(two, seed=0)
    assert len(train) == 1 and len(held_out) == 1


@RECIPES
def test_steps_default_to_one_epoch_over_the_pairs(recipe: ModuleType, tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", make_preference_pairs(100, seed=0))
    args = recipe.parse_args(["--pairs", pairs, "--batch-size", "8"])
    train, _ = common.preference_pairs(args)
    assert args.steps == math.ceil(len(train) / 8)


@RECIPES
def test_recipe_trains_on_a_pairs_file_and_probes_its_prompts(
    recipe: ModuleType, tmp_path: Path
) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", make_preference_pairs(80, seed=7))
    argv = ["--pairs", pairs, "--batch-size", "8", "--every-n-steps", "4", "--eval-steps", "4"]
    args = recipe.parse_args([*argv, "--output-dir", str(tmp_path / "run")])
    outcome = recipe.train(args)
    assert outcome.metrics["steps"] == args.steps == math.ceil(72 / 8)  # 8 pairs held out
    assert outcome.metrics["spinal/step"] == args.steps
    assert load_local_model(tmp_path / "run" / "final").config.num_hidden_layers == 4
    assert "spinal_events.jsonl" in outcome.saved["event log"]


Scalars = dict[tuple[str, str], list[tuple[int, float]]]


def tensorboard_scalars(root: Path) -> Scalars:
    """Every scalar of the run written under ``root``, as (step, value), keyed by (TensorBoard
    run, tag); a run is an event-file directory, named by its path under ``root``. The
    reference's flat lines (a ``reference`` run, under the run's own tags) are left out."""
    scalars: Scalars = {}
    directories = {path.parent for path in root.rglob("events.out.tfevents.*")}
    for directory in sorted(d for d in directories if d.name != "reference"):
        events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        events.Reload()
        run = directory.relative_to(root).as_posix()
        for tag in events.Tags()["scalars"]:
            points = [(e.step, e.value) for e in events.Scalars(tag)]
            scalars.setdefault((run, tag), []).extend(points)
    return scalars


def series(written: Scalars, tag: str) -> list[tuple[int, float]]:
    """The points of ``tag`` in whichever run wrote it, by step."""
    return sorted(point for (_, name), points in written.items() if name == tag for point in points)


@RECIPES
def test_recipe_probes_the_run_with_the_callback_on(recipe: ModuleType, tmp_path: Path) -> None:
    args = recipe.parse_args(
        ["--steps", "40", "--every-n-steps", "20", "--output-dir", str(tmp_path)]
    )
    metrics = recipe.run(args)
    written = tensorboard_scalars(tmp_path)
    slope = series(written, "spinal/ramp/contraction_slope")
    assert [step for step, _ in slope if step > 0] == [20, 40]
    assert slope[-1][1] == pytest.approx(metrics["spinal/contraction_slope"])
    # One contraction line per late block, whether the board keeps blocks as tags or as runs.
    assert len([key for key in written if key[1].startswith("spinal/contraction")]) == 4
    alert_levels = [level for _, level in series(written, "spinal/alert_level")]
    assert (max(alert_levels) > 0) == (metrics["spinal/alerts"] > 0)


def test_recipes_import_no_integration_without_the_callback() -> None:
    code = (
        "import sys; import recipes.trl_dpo, recipes.lightning_dpo; "
        "assert not [m for m in sys.modules if m.startswith('spinal_callback.integrations')]"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(not smollm2.available(), reason="run `make real-model` to build the checkpoint")
def test_a_real_checkpoint_is_fine_tuned_at_a_pretrained_rate_and_saved(tmp_path: Path) -> None:
    source = smollm2.checkpoint_dir()
    pairs = write_pairs(tmp_path / "pairs.jsonl", make_preference_pairs(20, seed=0))
    argv = ["--model", str(source), "--pairs", pairs, "--steps", "1", "--batch-size", "2"]
    args = trl_dpo.parse_args([*argv, "--no-spinal", "--output-dir", str(tmp_path / "run")])
    assert args.learning_rate == 5e-7
    trl_dpo.train(args)
    before, after = load_local_model(source), load_local_model(tmp_path / "run" / "final")
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(after.state_dict().values(), before.state_dict().values())
    )
    assert 0 < moved < 1e-5  # one Adam step at 5e-7 moves a weight by about 5e-7
    assert load_local_tokenizer(tmp_path / "run" / "final").vocab_size == 49152
