"""ProbeBatch construction and SpinalProbe.run() behaviour."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback import SpinalConfig
from spinal_callback.probe import capture
from spinal_callback.probe.metrics import contraction_score, transport_score
from spinal_callback.probe.model_access import ModelParts, resolve_model_parts
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe, late_band


def test_probe_batch_rejects_empty_text_list(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        ProbeBatch.from_texts(tokenizer, [])


def test_probe_batch_rejects_texts_that_tokenize_to_nothing(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    with pytest.raises(ValueError, match=r"positions \[1\] tokenize to nothing"):
        ProbeBatch.from_texts(tokenizer, [probe_texts[0], "", probe_texts[1]])


def test_probe_batch_rejects_too_few_tokens_for_the_spectrum(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    with pytest.raises(ValueError, match="needs at least 16"):
        ProbeBatch.from_texts(tokenizer, ["hi", "ok"])


def test_probe_batch_rejects_non_strings(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(TypeError, match="not strings"):
        ProbeBatch.from_texts(tokenizer, ["a fine text", 3])  # type: ignore[list-item]


def test_probe_batch_does_not_modify_the_tokenizer(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    before = (tokenizer.padding_side, tokenizer.pad_token, len(tokenizer))
    ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="left")
    assert (tokenizer.padding_side, tokenizer.pad_token, len(tokenizer)) == before


def test_probe_batch_truncates_to_max_length(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    assert ProbeBatch.from_texts(tokenizer, probe_texts, max_length=8).input_ids.shape == (
        len(probe_texts),
        8,
    )


def test_probe_batch_from_dataset_reads_prompts_and_chat_messages(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    rows = [{"prompt": text} for text in probe_texts[:4]]
    rows.append({"prompt": [{"role": "user", "content": probe_texts[4]}]})
    batch = ProbeBatch.from_dataset(tokenizer, rows, column="prompt")
    assert batch.input_ids.shape[0] == 5


def test_probe_batch_from_dataset_names_available_columns(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    class Dataset(list):  # type: ignore[type-arg]
        column_names = ("question", "chosen", "rejected")

    with pytest.raises(ValueError, match=r"no column 'prompt'.*'question'"):
        ProbeBatch.from_dataset(tokenizer, Dataset(), column="prompt")


def test_subsample_picks_the_same_tokens_for_either_padding_side(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    right = ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="right")
    left = ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="left")
    picked_right = right.input_ids.reshape(-1)[right.subsample(100, seed=3)]
    picked_left = left.input_ids.reshape(-1)[left.subsample(100, seed=3)]
    assert torch.equal(picked_right, picked_left)
    assert (right.attention_mask.reshape(-1)[right.subsample(100, seed=3)] == 1).all()


def test_default_late_band_is_last_third_at_least_four() -> None:
    assert late_band(8) == [4, 5, 6, 7]
    assert late_band(24) == list(range(16, 24))
    assert late_band(3) == [0, 1, 2]


def test_a_model_of_one_block_is_refused_at_setup(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    with pytest.raises(ValueError, match="1 decoder block.*needs at least 2"):
        SpinalProbe(make_model("llama", layers=1), probe_batch)


def test_late_band_accepts_negative_indices_and_rejects_out_of_range() -> None:
    assert late_band(8, [-1, -3, 5]) == [5, 7]
    with pytest.raises(ValueError, match=r"\[9\] out of range for a model with 8 blocks"):
        late_band(8, [6, 9])


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "opt"])
def test_left_and_right_padding_give_the_same_trace(
    architecture: str,
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    model = make_model(architecture)
    right = SpinalProbe(
        model, ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="right")
    ).run()
    left = SpinalProbe(
        model, ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="left")
    ).run()
    torch.testing.assert_close(left.contraction, right.contraction, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(left.transport, right.transport, rtol=1e-4, atol=1e-5)


def test_scores_equal_the_metrics_applied_to_the_models_hidden_states(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    model = make_model("llama", layers=6)
    config = SpinalConfig(late_layers=[2, 3, 4], lens_dtype="native")
    probe = SpinalProbe(model, probe_batch, config)
    trace = probe.run()
    with torch.no_grad():
        hidden_states = model(
            input_ids=probe_batch.input_ids,
            attention_mask=probe_batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states
    parts = resolve_model_parts(model)
    rows = [hidden_states[layer + 1].reshape(-1, 64) for layer in (2, 3, 4)]
    expected_contraction = torch.stack([contraction_score(r[probe.spectrum_index]) for r in rows])
    torch.testing.assert_close(trace.contraction, expected_contraction, rtol=1e-5, atol=1e-5)
    lens_index = probe.transport_index[: probe.lens_tokens[0]]
    lens = [parts.lens_logits(r[lens_index]) for r in rows]
    expected_transport = torch.stack([transport_score(lens[i], lens[i + 1]) for i in range(2)])
    torch.testing.assert_close(trace.transport, expected_transport, rtol=1e-5, atol=1e-6)


def test_a_bfloat16_lens_moves_transport_by_rounding_only(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    native = SpinalProbe(llama, probe_batch, SpinalConfig(lens_dtype="native")).run()
    bfloat16 = SpinalProbe(llama, probe_batch, SpinalConfig(lens_dtype="bfloat16")).run()
    gap = (bfloat16.transport - native.transport).abs().max().item()
    assert 0.0 < gap < 1e-3
    torch.testing.assert_close(bfloat16.contraction, native.contraction)


def test_auto_lens_is_bfloat16_only_on_a_float32_cpu_forward_with_native_bfloat16() -> None:
    hidden = torch.zeros(2, 3)
    native = torch.bfloat16 if capture.cpu_has_native_bfloat16() else None
    assert capture.lens_cast(hidden, "auto") == native
    assert capture.lens_cast(hidden.double(), "auto") is None
    assert capture.lens_cast(hidden, "native") is None
    assert capture.lens_cast(hidden.double(), "bfloat16") == torch.bfloat16


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 avx512f avx512bw avx512vl", False),  # AVX-512 emulates bfloat16
        ("fpu avx512f avx512_bf16", True),
        ("fpu avx512f amx_bf16 amx_tile", True),
        ("fp asimd bf16", False),  # Arm's bf16 is not counted: float32 there
    ],
)
def test_native_bfloat16_is_read_from_the_cpu_flags_not_from_onednn(
    flags: str, native: bool
) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\n"
    assert capture.has_native_bfloat16_flags(cpuinfo) is native


def test_a_bfloat16_lens_under_autocast_equals_the_one_with_a_cast_head_weight(
    llama: PreTrainedModel, probe_batch: ProbeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SpinalConfig(lens_dtype="bfloat16")
    cast_weight = SpinalProbe(llama, probe_batch, config).run()
    monkeypatch.setattr(ModelParts, "head_weight_as", lambda *args: None)
    autocast = SpinalProbe(llama, probe_batch, config).run()
    torch.testing.assert_close(autocast.transport, cast_weight.transport)


def test_lens_dtype_changes_the_probe_fingerprint_only_when_set(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    default = SpinalProbe(llama, probe_batch).probe_fingerprint
    assert SpinalProbe(llama, probe_batch, SpinalConfig(lens_dtype="auto")).probe_fingerprint == (
        default
    )
    assert SpinalProbe(llama, probe_batch, SpinalConfig(lens_dtype="native")).probe_fingerprint != (
        default
    )


def test_run_is_deterministic(llama: PreTrainedModel, probe_batch: ProbeBatch) -> None:
    probe = SpinalProbe(llama, probe_batch)
    first, second = probe.run(), probe.run()
    assert torch.equal(first.contraction, second.contraction)
    assert torch.equal(first.transport, second.transport)
    assert first.summary == second.summary


def test_run_records_step_band_and_fingerprints(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    trace = SpinalProbe(llama, probe_batch).run(step=42)
    assert trace.step == 42 and trace.layers == [4, 5, 6, 7] and trace.num_blocks == 8
    assert trace.contraction.dtype == torch.float32 and trace.transport.shape == (3,)
    assert trace.is_finite and len(trace.probe_fingerprint) == 16


def test_probe_fingerprint_changes_with_the_probe(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    one = SpinalProbe(llama, ProbeBatch.from_texts(tokenizer, probe_texts[:8]))
    other = SpinalProbe(llama, ProbeBatch.from_texts(tokenizer, probe_texts[8:]))
    assert one.probe_fingerprint != other.probe_fingerprint


def test_run_restores_each_modules_training_flag(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    llama.train()
    llama.model.layers[0].eval()
    seen: dict[str, Any] = {}
    llama.model.layers[7].register_forward_hook(
        lambda m, a, o: seen.update(training=m.training, grad=torch.is_grad_enabled())
    )
    SpinalProbe(llama, probe_batch).run()
    assert seen == {"training": False, "grad": False}
    assert llama.training and llama.model.layers[1].training
    assert not llama.model.layers[0].training


def test_run_restores_training_mode_when_the_forward_raises(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    llama.train()

    def explode(module: torch.nn.Module, args: Any, output: Any) -> None:
        raise RuntimeError("boom")

    probe = SpinalProbe(llama, probe_batch)
    handle = llama.model.layers[5].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        probe.run()
    handle.remove()
    assert llama.training
    assert all(not block._forward_hooks for block in llama.model.layers)


def test_run_leaves_no_hooks_and_skips_blocks_after_the_band(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    model = make_model("llama", layers=6)
    calls: list[str] = []
    model.model.layers[4].register_forward_hook(lambda *args: calls.append("block 4"))
    model.lm_head.register_forward_hook(lambda *args: calls.append("lm_head"))
    probe = SpinalProbe(model, probe_batch, SpinalConfig(late_layers=[1, 2, 3]))
    probe.run()  # the first run also checks the lens against one whole forward's logits
    assert calls.count("block 4") == 1
    calls.clear()
    probe.run()
    assert "block 4" not in calls
    assert [len(block._forward_hooks) for block in model.model.layers] == [0, 0, 0, 0, 1, 0]


def test_run_does_not_ask_for_all_hidden_states(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    seen: dict[str, Any] = {}
    llama.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    SpinalProbe(llama, probe_batch).run()
    assert seen["use_cache"] is False
    assert not seen.get("output_hidden_states")


def test_run_honours_autocast_dtype(llama: PreTrainedModel, probe_batch: ProbeBatch) -> None:
    dtypes: list[torch.dtype] = []
    llama.model.layers[7].mlp.register_forward_hook(
        lambda m, a, output: dtypes.append(output.dtype)
    )
    full = SpinalProbe(llama, probe_batch).run()
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    half = SpinalProbe(llama, probe_batch, SpinalConfig(autocast_dtype="bfloat16")).run()
    assert set(dtypes) == {torch.bfloat16}
    torch.testing.assert_close(half.contraction, full.contraction, rtol=0.05, atol=0.05)


def test_run_honours_an_enclosing_autocast(llama: PreTrainedModel, probe_batch: ProbeBatch) -> None:
    dtypes: list[torch.dtype] = []
    llama.model.layers[7].mlp.register_forward_hook(
        lambda m, a, output: dtypes.append(output.dtype)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        SpinalProbe(llama, probe_batch).run()
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_run_works_with_gradient_checkpointing_in_train_mode(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    reference = SpinalProbe(llama, probe_batch).run()
    llama.gradient_checkpointing_enable()
    llama.train()
    checkpointed = SpinalProbe(llama, probe_batch).run()
    torch.testing.assert_close(checkpointed.contraction, reference.contraction)
    assert llama.training


def test_probe_traces_the_peft_adapted_model(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    from peft import LoraConfig, get_peft_model

    base = SpinalProbe(llama, probe_batch).run()
    wrapped = get_peft_model(
        llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    for name, parameter in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    adapted = SpinalProbe(wrapped, probe_batch).run()
    with wrapped.disable_adapter():
        disabled = SpinalProbe(wrapped, probe_batch).run()
    assert not torch.allclose(adapted.contraction, base.contraction, atol=1e-3)
    torch.testing.assert_close(disabled.contraction, base.contraction)


def test_probe_of_a_compiled_model_matches_eager(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    eager = SpinalProbe(llama, probe_batch).run()
    compiled = SpinalProbe(torch.compile(llama), probe_batch).run()
    torch.testing.assert_close(compiled.contraction, eager.contraction)


def test_probe_longer_than_the_context_fails_at_setup(
    make_model: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = make_model("gpt2")
    long_batch = ProbeBatch.from_token_ids([list(range(4, 300)) * 2], pad_token_id=0)
    with pytest.raises(ValueError, match="592 tokens long but the model's context is 512"):
        SpinalProbe(model, long_batch)


def test_late_layers_out_of_range_fail_at_setup(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    with pytest.raises(ValueError, match="out of range"):
        SpinalProbe(llama, probe_batch, SpinalConfig(late_layers=[6, 8]))


@pytest.mark.parametrize("measure", ["hellinger", "fisher_rao", "js"])
def test_every_transport_measure_gives_bounded_scores(
    measure: str, llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    trace = SpinalProbe(llama, probe_batch, SpinalConfig(transport=measure)).run()
    assert trace.measure == measure
    assert ((trace.transport >= 0) & (trace.transport <= 1)).all()


def test_lens_chunking_does_not_change_the_scores(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    whole = SpinalProbe(llama, probe_batch).run()
    chunked = SpinalProbe(llama, probe_batch, SpinalConfig(lens_chunk_mib=1)).run()
    torch.testing.assert_close(chunked.transport, whole.transport, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_runs_on_the_models_cuda_device(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    cpu = SpinalProbe(llama, probe_batch).run()
    gpu = SpinalProbe(llama.cuda(), probe_batch).run()
    assert gpu.metadata["device"].startswith("cuda")
    torch.testing.assert_close(gpu.contraction, cpu.contraction, rtol=1e-3, atol=1e-3)


def test_stacking_pads_on_the_right_and_maps_each_batchs_tokens_into_the_stack(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    short = ProbeBatch.from_texts(tokenizer, probe_texts[:2], padding_side="left")
    long = ProbeBatch.from_texts(tokenizer, [" ".join(probe_texts[2:4])])
    stacked = ProbeBatch.stack([short, long])
    assert stacked.input_ids.shape == (3, long.input_ids.shape[1])
    index = long.valid_positions()
    mapped = long.flat_index_in(index, stacked.input_ids.shape[1], row_offset=2)
    assert torch.equal(stacked.input_ids.reshape(-1)[mapped], long.input_ids.reshape(-1)[index])
    index = short.valid_positions()
    mapped = short.flat_index_in(index, stacked.input_ids.shape[1], row_offset=0)
    assert torch.equal(stacked.input_ids.reshape(-1)[mapped], short.input_ids.reshape(-1)[index])


def test_next_tokens_are_the_following_real_token_or_minus_one_at_a_rows_end() -> None:
    batch = ProbeBatch.from_token_ids([[5, 6, 7] * 6, [8, 9] * 5], padding_side="left")
    index = batch.valid_positions()
    following = batch.next_tokens(index)
    assert following[:3].tolist() == [6, 7, 5] and following[17].item() == -1
    assert following[18:21].tolist() == [9, 8, 9] and following[-1].item() == -1


def test_a_neutral_group_in_the_same_forward_scores_as_if_probed_alone(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    model = make_model("qwen2", layers=6)
    task = ProbeBatch.from_texts(tokenizer, probe_texts[:8])
    neutral = ProbeBatch.from_texts(tokenizer, [t.upper() for t in probe_texts[8:]])
    both = SpinalProbe(model, task, neutral=neutral).run()
    alone = {"task": SpinalProbe(model, task).run(), "neutral": SpinalProbe(model, neutral).run()}
    assert both.neutral is not None
    for combined, single in ((both, alone["task"]), (both.neutral, alone["neutral"])):
        torch.testing.assert_close(combined.contraction, single.contraction, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(combined.transport, single.transport, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(combined.lens_entropy, single.lens_entropy, rtol=1e-4, atol=1e-5)
        assert combined.next_token_nll == pytest.approx(single.next_token_nll, rel=1e-4)


def test_next_token_nll_is_the_models_own_loss_on_the_probe_tokens(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    config = SpinalConfig(transport_tolerance=None)
    trace = SpinalProbe(llama, probe_batch, config).run()
    with torch.no_grad():
        logits = llama(
            input_ids=probe_batch.input_ids, attention_mask=probe_batch.attention_mask
        ).logits
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(
        -1, probe_batch.input_ids[:, 1:, None]
    )
    mask = probe_batch.attention_mask[:, 1:].bool()
    expected = -token_logps.squeeze(-1)[mask].mean()
    assert trace.next_token_nll == pytest.approx(float(expected), rel=1e-5)


def test_lens_entropy_is_per_layer_and_its_last_entry_is_the_summary(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    trace = SpinalProbe(llama, probe_batch).run()
    assert trace.lens_entropy is not None and trace.lens_entropy.shape == (4,)
    assert trace.lens_entropy[-1].item() == pytest.approx(trace.summary["lens_entropy"])
    assert bool((trace.lens_entropy > 0).all())


def test_groups_of_very_different_lengths_run_as_separate_forwards_with_the_same_scores(
    llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    short = ProbeBatch.from_texts(tokenizer, [" ".join(text.split()[:3]) for text in probe_texts])
    long = ProbeBatch.from_texts(tokenizer, [" ".join([text] * 4) for text in probe_texts])
    separate = SpinalProbe(llama, short, SpinalConfig(), long)
    separate.run()  # the first run also checks the lens, with one forward of its own
    forwards: list[int] = []
    hook = llama.model.layers[0].register_forward_pre_hook(lambda *a: forwards.append(1))
    trace = separate.run()
    assert len(forwards) == 2
    monkeypatch.setattr("spinal_callback.probe.spinal_probe.MAX_PADDING_WASTE", 1e9)
    stacked_probe = SpinalProbe(llama, short, SpinalConfig(), long)
    stacked_probe.run()
    forwards.clear()
    stacked = stacked_probe.run()
    hook.remove()
    assert len(forwards) == 1
    assert trace.neutral is not None and stacked.neutral is not None
    for ours, theirs in ((trace, stacked), (trace.neutral, stacked.neutral)):
        torch.testing.assert_close(ours.contraction, theirs.contraction, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.transport, theirs.transport, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("joined", [1, 3])
def test_the_default_probe_is_within_its_stated_accuracy_of_every_token_in_float64(
    llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    joined: int,
) -> None:
    """Transport within 0.01 and contraction within 2% of the same scores over every valid token,
    with the model and the spectra in float64 (the accuracy ``bench/probe_cost.py`` reports).
    620 valid tokens, or 1860 (texts joined by threes): both within the defaults' token counts,
    so what remains is the precision of the lens and the spectra."""
    import copy
    from dataclasses import replace

    texts = [
        " ".join(probe_texts[(i + k) % len(probe_texts)] for k in range(joined))
        for i in range(len(probe_texts))
    ]
    probe_batch = ProbeBatch.from_texts(tokenizer, texts)

    default = SpinalProbe(llama, probe_batch, SpinalConfig()).run()
    tokens = probe_batch.num_valid_tokens
    exact_config = replace(
        SpinalConfig(), spectrum_tokens=tokens, transport_tokens=tokens, spectrum_dtype="float64"
    )
    exact = SpinalProbe(copy.deepcopy(llama).double(), probe_batch, exact_config).run()
    transport_error = (default.transport.double() - exact.transport.double()).abs().max()
    contraction_error = (
        ((default.contraction.double() - exact.contraction.double()) / exact.contraction.double())
        .abs()
        .max()
    )
    assert float(transport_error) <= 0.01
    assert float(contraction_error) <= 0.02


def test_later_runs_take_the_lens_tokens_the_first_run_settled_on(
    llama: PreTrainedModel, probe_batch: ProbeBatch
) -> None:
    from dataclasses import replace

    probe = SpinalProbe(llama, probe_batch, SpinalConfig(transport_tolerance=1e-9))
    first = probe.run()
    assert first.metadata["transport_tokens"] == probe_batch.num_valid_tokens > 256
    probe.config = replace(probe.config, transport_tolerance=1.0)  # alone it would settle on 256
    second = probe.run()
    assert second.metadata["transport_tokens"] == first.metadata["transport_tokens"]


def test_probes_that_share_lens_tokens_measure_the_same_tokens(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    config = SpinalConfig(transport_tolerance=1e-9)  # settles on every sample token
    first = SpinalProbe(make_model("llama"), probe_batch, config)
    settled = first.run().metadata["transport_tokens"]
    loose = SpinalConfig(transport_tolerance=1.0)  # would settle on 256 alone
    second = SpinalProbe(make_model("llama", seed=1), probe_batch, loose, None, first.lens_tokens)
    assert second.run().metadata["transport_tokens"] == settled > 256
