"""`localize` finds a planted answer: the one block DPO was allowed to change, and its rank."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.demos.preference_data import (
    TOKENIZER_VOCAB_SIZE,
    make_preference_pairs,
    tokenizer_corpus,
)
from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer
from spinal_callback.tools.cli import main
from spinal_callback.tools.localize import Localization, localize, sparse_attribution
from spinal_callback.tools.pairs import collate_pairs, load_pairs, reply_logp_shifts
from spinal_callback.tools.patching import PatchRunner, check_same_architecture

pytest.importorskip("sklearn")
PLANTED_BLOCK = 2
PLANTED_RANK = 2
BLOCKS = 4


@pytest.fixture(scope="module")
def task_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)


@pytest.fixture(scope="module")
def base(task_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return build_tiny_model(
        "llama", vocab_size=len(task_tokenizer), hidden=64, layers=BLOCKS, seed=0
    ).eval()


def dpo_train(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, lr: float, steps: int = 40
) -> None:
    """Sigmoid DPO (beta 0.1) on the synthetic task, updating only what requires grad."""
    torch.manual_seed(0)
    reference = copy.deepcopy(model).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    for step in range(steps):
        batch = collate_pairs(tokenizer, make_preference_pairs(16, seed=100 + step))
        chosen, rejected = reply_logp_shifts(model, reference, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def one_block_tuned(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast
) -> PreTrainedModel:
    """DPO where only block 2 is trainable."""
    tuned = copy.deepcopy(base).requires_grad_(False)
    tuned.model.layers[PLANTED_BLOCK].requires_grad_(True)
    dpo_train(tuned, task_tokenizer, lr=1e-2)
    return tuned.requires_grad_(False)


@pytest.fixture(scope="module")
def rank_two_adapter(base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast) -> Any:
    """DPO through a rank-2 LoRA on block 2's MLP output projection (the PeftModel)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=PLANTED_RANK,
        lora_alpha=2 * PLANTED_RANK,
        target_modules=["down_proj"],
        layers_to_transform=[PLANTED_BLOCK],
        lora_dropout=0.0,
    )
    adapted = peft.get_peft_model(copy.deepcopy(base), config)
    dpo_train(adapted, task_tokenizer, lr=3e-2)
    return adapted.eval()


@pytest.fixture(scope="module")
def rank_two_tuned(rank_two_adapter: Any) -> PreTrainedModel:
    """The rank-2 LoRA merged: the change to block 2's output lies in a 2-dimensional subspace."""
    return copy.deepcopy(rank_two_adapter).merge_and_unload().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pairs() -> list[dict[str, str]]:
    return make_preference_pairs(32, seed=7)


@pytest.fixture(scope="module")
def one_block_result(
    base: PreTrainedModel,
    one_block_tuned: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
) -> Localization:
    return localize(
        base, one_block_tuned, task_tokenizer, pairs, progress=False, ranks=[1, 2, 4, 64]
    )


@pytest.fixture(scope="module")
def rank_two_result(
    base: PreTrainedModel,
    rank_two_tuned: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
) -> Localization:
    return localize(base, rank_two_tuned, task_tokenizer, pairs, progress=False, ranks=[1, 2, 4, 8])


def test_the_only_trained_block_is_ranked_first(one_block_result: Localization) -> None:
    result = one_block_result
    assert result.margin_tuned > result.margin_base
    assert result.ranking[0] == PLANTED_BLOCK
    low, high = result.gain_ci[PLANTED_BLOCK]
    assert low > 0.5 and low <= result.gain[PLANTED_BLOCK] <= high
    for untouched in range(PLANTED_BLOCK):
        assert result.effect[untouched] == pytest.approx(0.0, abs=1e-9)
        assert result.distance[untouched] == pytest.approx(0.0, abs=1e-9)
    assert result.effect[-1] == pytest.approx(1.0, abs=1e-4)


def test_a_planted_rank_two_change_is_recovered_at_rank_two(
    rank_two_result: Localization,
) -> None:
    result = rank_two_result
    assert result.ranking[0] == PLANTED_BLOCK
    recovery = next(r for r in result.low_rank if r.layer == PLANTED_BLOCK)
    by_rank = dict(zip(recovery.ranks, recovery.recovered))
    assert by_rank[PLANTED_RANK] >= 0.9
    assert by_rank[8] == pytest.approx(by_rank[PLANTED_RANK], abs=1e-3)
    assert dict(zip(recovery.ranks, recovery.energy))[PLANTED_RANK] == pytest.approx(1.0, abs=1e-6)


def test_blocks_with_no_share_of_the_effect_get_no_low_rank_analysis(
    rank_two_result: Localization,
) -> None:
    analysed = {r.layer for r in rank_two_result.low_rank}
    assert PLANTED_BLOCK in analysed
    assert analysed.isdisjoint(range(PLANTED_BLOCK))


def test_patching_costs_layers_plus_two_forwards_per_batch(
    one_block_result: Localization,
) -> None:
    settings = one_block_result.settings
    assert settings["batches"] == 4  # 32 pairs, 8 per batch
    assert settings["patching_forwards_per_batch"] == BLOCKS + 2
    analysed = len(one_block_result.low_rank)
    assert settings["low_rank_forwards_per_batch"] == 4 + analysed * 4


def test_patching_every_token_of_a_block_after_the_change_reproduces_the_tuned_margin(
    base: PreTrainedModel,
    one_block_tuned: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
) -> None:
    result = localize(
        base, one_block_tuned, task_tokenizer, pairs[:8], all_tokens=True, top_layers=0,
        progress=False, bootstrap=50,
    )  # fmt: skip
    assert result.effect[:PLANTED_BLOCK] == pytest.approx([0.0] * PLANTED_BLOCK, abs=1e-9)
    assert result.effect[PLANTED_BLOCK:] == pytest.approx(
        [1.0] * (BLOCKS - PLANTED_BLOCK), abs=1e-4
    )
    assert result.low_rank == []


def test_models_are_left_in_the_mode_they_were_in(
    base: PreTrainedModel,
    one_block_tuned: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
) -> None:
    base.train()
    try:
        localize(base, one_block_tuned, task_tokenizer, pairs[:4], top_layers=0, progress=False,
                 bootstrap=10)  # fmt: skip
        assert base.training and all(m.training for m in base.modules())
        assert not one_block_tuned.training
    finally:
        base.eval()


def test_a_tuned_model_equal_to_its_base_has_nothing_to_localize(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast, pairs: list[dict[str, str]]
) -> None:
    with pytest.raises(ValueError, match="nothing to localize"):
        localize(base, copy.deepcopy(base), task_tokenizer, pairs[:4], progress=False)


def test_models_of_different_depth_are_rejected(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast, pairs: list[dict[str, str]]
) -> None:
    deeper = build_tiny_model("llama", vocab_size=len(task_tokenizer), hidden=64, layers=6)
    with pytest.raises(ValueError, match="4 blocks and the tuned one 6"):
        localize(base, deeper, task_tokenizer, pairs[:4], progress=False)


def test_a_pair_longer_than_the_context_is_rejected_before_any_forward(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast, pairs: list[dict[str, str]]
) -> None:
    long_prompt = " ".join(["alpha"] * (base.config.max_position_embeddings + 5))
    too_long = [*pairs[:9], {**pairs[9], "prompt": long_prompt}]
    with pytest.raises(ValueError, match=r"among pairs 8\.\.15 .* beyond the model's context"):
        localize(base, base, task_tokenizer, too_long, progress=False)


@pytest.fixture
def no_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if localize runs any forward."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("localize ran a forward before rejecting its input")

    monkeypatch.setattr(PatchRunner, "_margin", forbidden)


@pytest.mark.usefixtures("no_forward")
def test_ranks_beyond_the_width_are_rejected_before_any_forward(
    base: PreTrainedModel,
    one_block_tuned: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
) -> None:
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, 64\]"):
        localize(base, one_block_tuned, task_tokenizer, pairs[:4], ranks=[1, 128], progress=False)
    with pytest.raises(ValueError, match="ranks must be positive"):
        localize(base, one_block_tuned, task_tokenizer, pairs[:4], ranks=[0, 2], progress=False)


@pytest.mark.usefixtures("no_forward")
def test_models_of_different_width_are_rejected_before_any_forward(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast, pairs: list[dict[str, str]]
) -> None:
    wider = build_tiny_model("llama", vocab_size=len(task_tokenizer), hidden=96, layers=BLOCKS)
    with pytest.raises(ValueError, match=r"width 64 and vocabulary \d+, the tuned one 96"):
        localize(base, wider, task_tokenizer, pairs[:4], progress=False)


@pytest.mark.usefixtures("no_forward")
def test_a_tuned_model_of_another_architecture_with_the_same_sizes_is_rejected(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast, pairs: list[dict[str, str]]
) -> None:
    gpt2 = build_tiny_model("gpt2", vocab_size=len(task_tokenizer), hidden=64, layers=BLOCKS)
    message = r"base model is a llama \(LlamaForCausalLM\) and the tuned one a gpt2 \(GPT2LMHead"
    with pytest.raises(ValueError, match=message):
        localize(base, gpt2, task_tokenizer, pairs[:4], progress=False)


@pytest.mark.usefixtures("no_forward")
def test_a_tuned_model_with_other_parameter_shapes_is_rejected_naming_the_first(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast, pairs: list[dict[str, str]]
) -> None:
    config = copy.deepcopy(base.config)
    config.intermediate_size = base.config.intermediate_size + 32
    wider_mlp = type(base)(config).eval()
    expected = (
        rf"'model.layers.0.mlp.gate_proj.weight' has shape \({base.config.intermediate_size}, 64\)"
        rf" in the base model and \({config.intermediate_size}, 64\) in the tuned one"
    )
    with pytest.raises(ValueError, match=expected):
        localize(base, wider_mlp, task_tokenizer, pairs[:4], progress=False)


def test_a_tuned_model_with_a_parameter_the_base_lacks_is_rejected(
    base: PreTrainedModel,
) -> None:
    tuned = copy.deepcopy(base)
    tuned.model.layers[1].register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"tuned model has a parameter 'model.layers.1.extra'"):
        check_same_architecture(base, tuned)
    with pytest.raises(ValueError, match=r"base model has a parameter 'model.layers.1.extra'"):
        check_same_architecture(tuned, base)


def test_an_unmerged_peft_adapter_on_the_base_is_the_same_architecture(
    base: PreTrainedModel, rank_two_adapter: Any
) -> None:
    check_same_architecture(base, rank_two_adapter)


def test_cli_rejects_a_tuned_checkpoint_of_another_architecture_in_one_line(
    tmp_path: Path,
    base: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gpt2 = build_tiny_model("gpt2", vocab_size=len(task_tokenizer), hidden=64, layers=BLOCKS)
    gpt2.save_pretrained(tmp_path / "gpt2")
    status = run_localize(tmp_path, base, task_tokenizer, pairs[:8], "gpt2", ["--no-progress"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spinal")]
    assert status == 2
    assert len(errors) == 1 and "and the tuned one a gpt2 (GPT2LMHeadModel)" in errors[0]
    assert not (tmp_path / "out").exists()


def test_lasso_selects_the_layer_whose_distance_explains_the_gain() -> None:
    generator = torch.Generator().manual_seed(0)
    distances = torch.rand(60, 5, generator=generator, dtype=torch.float64)
    gains = 3.0 * distances[:, 1] + 0.01 * torch.randn(60, generator=generator, dtype=torch.float64)
    fit = sparse_attribution(distances, gains)
    assert fit is not None
    assert fit.selected[0] == 1 and fit.r2 > 0.95
    assert abs(fit.coefficients[1]) > 10 * max(
        abs(c) for i, c in enumerate(fit.coefficients) if i != 1
    )


def test_lasso_needs_five_pairs() -> None:
    assert sparse_attribution(torch.rand(4, 3, dtype=torch.float64), torch.rand(4)) is None


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pairs_are_read_from_jsonl_and_bad_lines_are_named(tmp_path: Path) -> None:
    good = {"prompt": "a b", "chosen": " b", "rejected": " c", "id": 3}
    assert load_pairs(write_lines(tmp_path / "ok.jsonl", [json.dumps(good), ""])) == [
        {"prompt": "a b", "chosen": " b", "rejected": " c"}
    ]
    cases = {
        "missing.jsonl": ([json.dumps(good), json.dumps({"prompt": "a", "chosen": "b"})],
                          r"missing.jsonl:2 lacks \['rejected'\]"),
        "broken.jsonl": (["{not json"], "broken.jsonl:1 is not JSON"),
        "typed.jsonl": ([json.dumps({**good, "chosen": 3})], "'chosen' must be a string"),
        "empty.jsonl": ([""], "holds no preference pair"),
    }  # fmt: skip
    for name, (lines, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_pairs(write_lines(tmp_path / name, lines))
    with pytest.raises(FileNotFoundError, match="no pairs file"):
        load_pairs(tmp_path / "absent.jsonl")


def run_localize(
    root: Path,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
    tuned: str,
    options: list[str],
) -> int:
    """``spinal localize`` on ``base`` (saved with its tokenizer under ``root/base``) and the
    tuned directory ``root/<tuned>``, writing to ``root/out``; returns the exit status."""
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    pairs_file = write_lines(root / "pairs.jsonl", [json.dumps(p) for p in pairs])
    return main([
        "localize", "--base", str(root / "base"), "--tuned", str(root / tuned),
        "--pairs", str(pairs_file), "--out", str(root / "out"), *options,
    ])  # fmt: skip


def test_cli_writes_table_json_and_figure_from_saved_checkpoints(
    tmp_path: Path,
    base: PreTrainedModel,
    rank_two_tuned: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    rank_two_tuned.save_pretrained(tmp_path / "tuned")
    options = ["--bootstrap", "100", "--ranks", "1", "2", "4"]
    status = run_localize(tmp_path, base, task_tokenizer, pairs[:16], "tuned", options)
    out = tmp_path / "out"
    captured = capsys.readouterr()
    assert status == 0
    assert "ranking by gain: [2," in captured.out
    assert "patching" in captured.err  # the progress bar
    report = json.loads((out / "localize.json").read_text())
    assert report["ranking"][0] == PLANTED_BLOCK and report["pairs"] == 16
    assert (out / "localize.png").stat().st_size > 0


def test_cli_takes_a_peft_adapter_directory_as_the_tuned_model(
    tmp_path: Path,
    base: PreTrainedModel,
    rank_two_adapter: Any,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    rank_two_adapter.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    options = ["--bootstrap", "50", "--top-layers", "0", "--no-progress"]
    status = run_localize(tmp_path, base, task_tokenizer, pairs[:16], "adapter", options)
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "localize.json").read_text())
    assert report["ranking"][0] == PLANTED_BLOCK
    assert report["margin_tuned"] > report["margin_base"]


def test_cli_reports_a_missing_pairs_file_and_exits_2(
    tmp_path: Path, base: PreTrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    base.save_pretrained(tmp_path / "base")
    status = main([
        "localize", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "base"),
        "--pairs", str(tmp_path / "absent.jsonl"),
    ])  # fmt: skip
    assert status == 2
    assert "no pairs file" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_two_models_may_sit_on_different_devices(
    base: PreTrainedModel,
    one_block_tuned: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
    one_block_result: Localization,
) -> None:
    on_gpu = copy.deepcopy(one_block_tuned).to("cuda")
    result = localize(base, on_gpu, task_tokenizer, pairs, progress=False, ranks=[1, 2, 4, 64])
    assert result.ranking == one_block_result.ranking
    assert result.effect == pytest.approx(one_block_result.effect, abs=1e-4)


@pytest.mark.usefixtures("no_forward")
def test_one_pair_is_refused_before_any_forward_as_too_few_for_an_interval(
    base: PreTrainedModel, task_tokenizer: PreTrainedTokenizerFast, pairs: list[dict[str, str]]
) -> None:
    with pytest.raises(ValueError, match="needs at least 2 preference pairs, got 1: .*add pairs"):
        localize(base, base, task_tokenizer, pairs[:1], progress=False)


def test_cli_refuses_one_pair_before_loading_a_model(
    tmp_path: Path,
    base: PreTrainedModel,
    task_tokenizer: PreTrainedTokenizerFast,
    pairs: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("spinal localize loaded a model before counting the pairs")

    monkeypatch.setattr("spinal_callback.tools.cli.load_local_model", forbidden)
    status = run_localize(tmp_path, base, task_tokenizer, pairs[:1], "base", ["--no-progress"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spinal")]
    assert status == 2
    assert errors == [
        "spinal localize: error: localize needs at least 2 preference pairs, got 1: its "
        "confidence intervals resample the pairs, and resamples of one pair all equal it (an "
        "interval of zero width); add pairs (a few dozen give useful intervals)"
    ]
