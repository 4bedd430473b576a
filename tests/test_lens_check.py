"""The logit lens is the model's own head: checked, and the model's logit scale taken, before the
first probe."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.config import SpinalConfig
from spinal_callback.demos.tiny import TINY_ARCHITECTURES, llama_like
from spinal_callback.probe.lens_check import fit_logits, largest_gap, same_logit_scale
from spinal_callback.probe.model_access import ModelAccessError, resolve_model_parts
from spinal_callback.probe.spinal_probe import LENS_CHECK_ATTEMPTS, ProbeBatch, SpinalProbe


def last_block_output_and_logits(
    probe: SpinalProbe, batch: ProbeBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    captured: list[torch.Tensor] = []
    handle = probe.parts.blocks[-1].register_forward_hook(
        lambda module, args, output: captured.append(
            output[0] if isinstance(output, tuple) else output
        )
    )
    with torch.no_grad():
        logits = probe.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    handle.remove()
    return captured[0], logits


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_after_the_first_run_the_lens_of_the_last_block_gives_the_models_logits(
    architecture: str,
    make_model: Callable[..., PreTrainedModel],
    probe_batch: ProbeBatch,
) -> None:
    probe = SpinalProbe(make_model(architecture, layers=4), probe_batch)
    probe.run()
    hidden, logits = last_block_output_and_logits(probe, probe_batch)
    with torch.no_grad():
        lens = probe.parts.lens_logits(hidden)
    torch.testing.assert_close(
        torch.log_softmax(lens, -1), torch.log_softmax(logits, -1), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    ("architecture", "scale"),
    [("cohere", 0.0625), ("granite", 1 / 8), ("llama", None), ("gemma2", None), ("opt", None)],
)
def test_the_probe_takes_the_models_logit_scale_and_no_other(
    architecture: str,
    scale: float | None,
    make_model: Callable[..., PreTrainedModel],
    probe_batch: ProbeBatch,
) -> None:
    probe = SpinalProbe(make_model(architecture, layers=4), probe_batch)
    assert probe.parts.logit_scale is None
    trace = probe.run()
    assert probe.lens_checked
    if scale is None:
        assert probe.parts.logit_scale is None
    else:
        assert probe.parts.logit_scale == pytest.approx(scale, rel=1e-5)
    assert trace.metadata["logit_scale"] == probe.parts.logit_scale


def test_a_scaled_models_next_token_nll_is_its_own(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    batch = ProbeBatch.from_texts(tokenizer, probe_texts[:4])  # < 256 tokens: the lens takes all
    probe = SpinalProbe(make_model("cohere", layers=4), batch)
    trace = probe.run()
    assert probe.lens_tokens[0] == batch.num_valid_tokens
    _, logits = last_block_output_and_logits(probe, batch)
    targets = batch.input_ids[:, 1:]
    has_target = batch.attention_mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1][has_target].double(), targets[has_target], reduction="mean"
    )
    assert trace.next_token_nll == pytest.approx(float(nll), rel=1e-4)


def test_a_head_transform_no_scale_explains_fails_the_first_run_with_what_to_do(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    model = make_model("llama", layers=4)
    original = model.forward
    vocabulary_bias = 3.0 * torch.randn(model.config.vocab_size)

    def forward(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        output.logits = output.logits + vocabulary_bias
        return output

    model.forward = forward  # type: ignore[method-assign]
    probe = SpinalProbe(model, probe_batch)
    with pytest.raises(ModelAccessError, match="does not give the model's next-token") as error:
        probe.run()
    assert "head_path" in str(error.value)
    assert "LlamaForCausalLM" in str(error.value)


def test_the_fitted_scale_is_exact_whatever_constant_each_token_adds() -> None:
    raw = torch.randn(6, 50, dtype=torch.float64)
    shifted = 0.3 * raw + torch.randn(6, 1, dtype=torch.float64)
    fit = fit_logits(raw, shifted)
    assert fit.scale == pytest.approx(0.3, rel=1e-12)
    assert fit.residual == pytest.approx(0.0, abs=1e-12)
    assert largest_gap(0.3 * raw, shifted) == pytest.approx(0.0, abs=1e-12)
    assert largest_gap(raw, shifted) > 0.05
    assert fit_logits(raw, shifted + torch.randn(50, dtype=torch.float64)).residual > 0.5


def with_forward(model: PreTrainedModel, change: Callable[[Any], Any]) -> PreTrainedModel:
    """``model`` whose forward's output goes through ``change`` (a head the lens cannot see)."""
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return change(original(*args, **kwargs))

    model.forward = forward  # type: ignore[method-assign]
    return model


def with_logits(output: Any, logits: torch.Tensor | None) -> Any:
    output.logits = logits
    return output


@pytest.mark.parametrize("in_bfloat16", ["autocast", "weights"])
def test_a_scale_that_bfloat16_rounds_is_still_found(
    in_bfloat16: str,
    make_model: Callable[..., PreTrainedModel],
    probe_batch: ProbeBatch,
) -> None:
    model = make_model("cohere", layers=4)
    model.config.logit_scale = 0.8333  # Command R+'s, not a power of two
    model.logit_scale = 0.8333
    config = SpinalConfig(autocast_dtype="bfloat16" if in_bfloat16 == "autocast" else None)
    if in_bfloat16 == "weights":
        model = model.to(torch.bfloat16)
    probe = SpinalProbe(model, probe_batch, config)
    probe.run()
    assert probe.parts.logit_scale == pytest.approx(0.8333, rel=1e-2)


def test_the_check_reads_a_left_padded_probe_from_its_first_real_token(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    batch = ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="left")
    probe = SpinalProbe(make_model("granite", layers=4), batch)
    probe.run()
    assert probe.parts.logit_scale == pytest.approx(1 / 8, rel=1e-5)


def test_a_model_that_returns_the_last_positions_only_is_checked_on_them(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    model = with_forward(
        make_model("cohere", layers=4), lambda out: with_logits(out, out.logits[:, -2:])
    )
    probe = SpinalProbe(model, probe_batch)
    probe.run()
    assert probe.parts.logit_scale == pytest.approx(0.0625, rel=1e-5)


def test_a_model_that_returns_another_vocabulary_is_told_to_name_its_head(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    model = with_forward(
        make_model("llama", layers=4), lambda out: with_logits(out, out.logits[..., :-10])
    )
    with pytest.raises(ModelAccessError, match="384 logits per token and the model returns 374"):
        SpinalProbe(model, probe_batch).run()


def test_a_model_that_returns_no_logits_is_probed_with_a_warning_that_the_lens_is_unverified(
    make_model: Callable[..., PreTrainedModel],
    probe_batch: ProbeBatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = with_forward(make_model("llama", layers=4), lambda out: with_logits(out, None))
    probe = SpinalProbe(model, probe_batch)
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        assert probe.run().is_finite
    assert probe.lens_checked and probe.parts.logit_scale is None
    assert "the logit lens is unverified: the model returns no logits" in caplog.text


def test_a_multimodal_configs_soft_cap_is_read_from_its_text_config(
    make_model: Callable[..., PreTrainedModel],
) -> None:
    model = make_model("llama", layers=4)
    text_config = copy.copy(model.config)
    text_config.final_logit_softcapping = 30.0
    model.config.get_text_config = lambda *args, **kwargs: text_config
    assert resolve_model_parts(model).logit_softcap == 30.0


def test_an_overflowed_model_is_still_probed_and_checked_at_a_later_run(
    make_model: Callable[..., PreTrainedModel],
    probe_batch: ProbeBatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_model("cohere", layers=4)
    weight = model.get_output_embeddings().weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    probe = SpinalProbe(model, probe_batch)
    trace = probe.run()
    assert not torch.isfinite(trace.transport).all()
    assert not probe.lens_checked
    with torch.no_grad():
        weight.copy_(saved)
    probe.run()
    assert probe.lens_checked
    assert probe.parts.logit_scale == pytest.approx(0.0625, rel=1e-5)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    stuck = SpinalProbe(model, probe_batch)
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        for _ in range(LENS_CHECK_ATTEMPTS):
            stuck.run()
    assert stuck.lens_checked and stuck.parts.logit_scale is None
    assert "keeps giving non-finite logits" in caplog.text


def hub_architecture(name: str, vocab_size: int, **extra: Any) -> PreTrainedModel:
    config = llama_like(getattr(transformers, f"{name}Config"))(vocab_size, 64, 4, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("name", "extra", "scale"),
    [
        ("Lfm2", {}, None),  # its final norm is called embedding_norm
        ("FalconH1", {"lm_head_multiplier": 0.5}, 0.5),  # a multiplier outside the head
    ],
)
def test_unusual_final_norms_and_head_multipliers_of_other_architectures(
    name: str,
    extra: dict[str, Any],
    scale: float | None,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    batch = ProbeBatch.from_texts(tokenizer, probe_texts[:2])  # FalconH1's scan is slow on a CPU
    probe = SpinalProbe(hub_architecture(name, len(tokenizer), **extra), batch)
    assert probe.run().is_finite
    assert probe.parts.logit_scale == (None if scale is None else pytest.approx(scale, rel=1e-5))


def test_two_fits_of_one_scale_compare_and_a_missing_scale_does_not() -> None:
    assert same_logit_scale(None, None)
    assert same_logit_scale(0.8330, 0.8333)  # refits in bfloat16
    assert not same_logit_scale(None, 0.0625)
    assert not same_logit_scale(0.0625, 0.125)
