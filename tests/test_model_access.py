"""Finding blocks, final norm and unembedding across architectures and wrappers."""

from __future__ import annotations

import copy
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from spinal_callback.demos.tiny import TINY_ARCHITECTURES
from spinal_callback.probe.model_access import (
    HIDDEN_SIZE_NAMES,
    ModelAccessError,
    check_reference_model,
    hidden_size,
    resolve_model_parts,
    unwrap_model,
)

EXPECTED_PATHS = {
    "llama": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "qwen3": ("model.layers", "model.norm"),
    "gemma2": ("model.layers", "model.norm"),
    "phi3": ("model.layers", "model.norm"),
    "cohere": ("model.layers", "model.norm"),
    "granite": ("model.layers", "model.norm"),
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm"),
}


def test_every_tiny_architecture_has_expected_paths() -> None:
    assert set(EXPECTED_PATHS) == set(TINY_ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(EXPECTED_PATHS))
def test_resolves_blocks_norm_and_head(
    architecture: str, make_model: Callable[..., PreTrainedModel]
) -> None:
    model = make_model(architecture, layers=6)
    parts = resolve_model_parts(model)
    assert (parts.paths["blocks"], parts.paths["final_norm"]) == EXPECTED_PATHS[architecture]
    assert parts.num_blocks == 6
    assert parts.head is model.get_output_embeddings()


def test_opt_projection_and_gemma2_softcap_are_part_of_the_lens(
    make_model: Callable[..., PreTrainedModel],
) -> None:
    assert resolve_model_parts(make_model("opt")).head_input is not None
    assert resolve_model_parts(make_model("gemma2")).logit_softcap == 30.0


def test_tied_embeddings_share_the_unembedding_weight(
    make_model: Callable[..., PreTrainedModel],
) -> None:
    model = make_model("gpt2")
    parts = resolve_model_parts(model)
    assert parts.head.weight is model.get_input_embeddings().weight


def test_tied_model_without_output_module_unembeds_through_input_embeddings(
    make_model: Callable[..., PreTrainedModel],
) -> None:
    model = make_model("gpt2")
    model.config.tie_word_embeddings = True
    model.get_output_embeddings = lambda: None  # type: ignore[method-assign]
    parts = resolve_model_parts(model)
    hidden = torch.randn(3, model.config.n_embd)
    torch.testing.assert_close(parts.head(hidden), hidden @ model.get_input_embeddings().weight.T)


def test_resolves_through_peft_lora(llama: PreTrainedModel) -> None:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    parts = resolve_model_parts(wrapped)
    assert parts.model is llama
    assert "lora" in " ".join(n for n, _ in parts.blocks[0].named_modules())


def test_resolves_through_torch_compile_to_the_eager_module(llama: PreTrainedModel) -> None:
    assert unwrap_model(torch.compile(llama)) is llama


@pytest.fixture
def single_process_group() -> Iterator[None]:
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("single_process_group")
def test_resolves_through_ddp_around_peft(llama: PreTrainedModel) -> None:
    from peft import LoraConfig, get_peft_model

    wrapped = nn.parallel.DistributedDataParallel(
        get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    )
    assert resolve_model_parts(wrapped).model is llama


def test_explicit_paths_override_the_lookup(llama: PreTrainedModel) -> None:
    parts = resolve_model_parts(
        llama, blocks_path="model.layers", final_norm_path="model.norm", head_path="lm_head"
    )
    assert parts.paths == {"blocks": "model.layers", "final_norm": "model.norm", "head": "lm_head"}


class UnknownLM(nn.Module):
    """An architecture the lookup does not know: blocks under `trunk.stages`."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Module()
        self.trunk.stages = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.trunk.last_norm = nn.LayerNorm(8)
        self.unembed = nn.Linear(8, 20)


def test_unknown_architecture_error_names_what_was_found_and_the_fix() -> None:
    with pytest.raises(ModelAccessError) as error:
        resolve_model_parts(UnknownLM())
    message = str(error.value)
    assert "trunk.stages (3 x Linear)" in message
    assert "blocks_path=" in message


def test_unknown_architecture_resolves_with_explicit_paths() -> None:
    model = UnknownLM()
    parts = resolve_model_parts(model, "trunk.stages", "trunk.last_norm", "unembed")
    assert parts.blocks is model.trunk.stages and parts.head is model.unembed


def test_missing_final_norm_error_lists_norms_and_the_option() -> None:
    with pytest.raises(ModelAccessError, match=r"trunk.last_norm.*final_norm_path="):
        resolve_model_parts(UnknownLM(), blocks_path="trunk.stages")


def test_missing_head_error_names_the_option() -> None:
    with pytest.raises(ModelAccessError, match="head_path="):
        resolve_model_parts(
            UnknownLM(), blocks_path="trunk.stages", final_norm_path="trunk.last_norm"
        )


def test_wrong_explicit_blocks_path_is_reported(llama: PreTrainedModel) -> None:
    with pytest.raises(ModelAccessError, match="blocks_path='model.blocks'"):
        resolve_model_parts(llama, blocks_path="model.blocks")


def test_reference_check_accepts_the_policy_itself(llama: PreTrainedModel) -> None:
    check_reference_model(llama, llama)


def test_reference_check_accepts_a_copy_of_the_policy(llama: PreTrainedModel) -> None:
    check_reference_model(llama, copy.deepcopy(llama))


def test_reference_check_accepts_a_lora_policy_with_a_plain_model_of_its_base(
    make_model: Callable[..., PreTrainedModel],
) -> None:
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    check_reference_model(policy, make_model("llama"))


def test_reference_with_another_depth_is_rejected_naming_both_depths(
    make_model: Callable[..., PreTrainedModel],
) -> None:
    with pytest.raises(ValueError, match="number of decoder blocks is 2 but the policy's is 4"):
        check_reference_model(make_model("llama", layers=4), make_model("llama", layers=2))


def test_reference_with_a_larger_vocabulary_is_rejected_naming_both_sizes(
    llama: PreTrainedModel,
) -> None:
    reference = copy.deepcopy(llama)
    reference.resize_token_embeddings(llama.config.vocab_size + 64)
    expected = f"vocabulary size is {llama.config.vocab_size + 64} but the policy's is "
    with pytest.raises(ValueError, match=f"{expected}{llama.config.vocab_size}"):
        check_reference_model(llama, reference)


@pytest.mark.parametrize(
    ("architecture", "model_class"), [("qwen2", "Qwen2ForCausalLM"), ("gpt2", "GPT2LMHeadModel")]
)
def test_reference_of_another_architecture_is_rejected_naming_both(
    architecture: str, model_class: str, make_model: Callable[..., PreTrainedModel]
) -> None:
    expected = (
        f"architecture is '{architecture}' ({model_class}) "
        "but the policy's is 'llama' (LlamaForCausalLM)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_reference_model(make_model("llama"), make_model(architecture))


def test_reference_with_another_hidden_size_is_rejected_naming_both_sizes(
    make_model: Callable[..., PreTrainedModel],
) -> None:
    with pytest.raises(ValueError, match="hidden size is 128 but the policy's is 64"):
        check_reference_model(make_model("llama", hidden=64), make_model("llama", hidden=128))


@pytest.mark.parametrize(
    "reference_options",
    [{"layers": 2}, {"hidden": 128}, {"architecture": "qwen2"}],
    ids=["depth", "hidden", "architecture"],
)
def test_every_mismatch_says_the_reference_must_be_the_policys_starting_point(
    reference_options: dict[str, object], make_model: Callable[..., PreTrainedModel]
) -> None:
    with pytest.raises(ValueError, match="must be the policy's starting point") as error:
        check_reference_model(make_model("llama", layers=4), make_model(**reference_options))
    assert "the model the policy was loaded from" in str(error.value)


@pytest.mark.parametrize("path", ["/some/path", Path("/some/path")], ids=["str", "Path"])
def test_path_as_reference_is_rejected_with_how_to_load_it(
    path: str | Path, llama: PreTrainedModel
) -> None:
    with pytest.raises(TypeError, match="got the path '/some/path'") as error:
        check_reference_model(llama, path)
    message = str(error.value)
    assert "AutoModelForCausalLM.from_pretrained('/some/path')" in message
    assert "spinal_callback.probe.loading.load_local_model('/some/path')" in message


def test_non_module_reference_is_rejected_naming_its_type(llama: PreTrainedModel) -> None:
    with pytest.raises(TypeError, match="must be an nn.Module, got an object of type OrderedDict"):
        check_reference_model(llama, llama.state_dict())


def test_reference_without_the_policys_parts_is_rejected_naming_its_class(
    llama: PreTrainedModel,
) -> None:
    with pytest.raises(ValueError, match=r"reference model \(UnknownLM\)") as error:
        check_reference_model(llama, UnknownLM())
    assert not isinstance(error.value, ModelAccessError)


def test_policy_without_findable_parts_raises_the_lookups_own_error() -> None:
    with pytest.raises(ModelAccessError, match="blocks_path="):
        check_reference_model(UnknownLM(), UnknownLM())


def test_reference_check_applies_explicit_paths_to_both_models() -> None:
    paths = {"blocks_path": "trunk.stages", "final_norm_path": "trunk.last_norm"}
    check_reference_model(UnknownLM(), UnknownLM(), head_path="unembed", **paths)


def test_models_without_a_config_are_compared_by_decoder_block_class() -> None:
    reference = UnknownLM()
    reference.trunk.stages = nn.ModuleList([nn.Identity() for _ in range(3)])
    paths = {"blocks_path": "trunk.stages", "final_norm_path": "trunk.last_norm"}
    with pytest.raises(
        ValueError, match="decoder block class is Identity but the policy's is Linear"
    ):
        check_reference_model(UnknownLM(), reference, head_path="unembed", **paths)


UNKNOWN_PATHS = {"blocks_path": "trunk.stages", "final_norm_path": "trunk.last_norm"}


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_hidden_size_is_the_width_of_every_tiny_architecture(
    architecture: str, make_model: Callable[..., PreTrainedModel]
) -> None:
    assert hidden_size(resolve_model_parts(make_model(architecture, hidden=48))) == 48


def test_hidden_size_looks_through_wrappers(llama: PreTrainedModel) -> None:
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert hidden_size(resolve_model_parts(torch.compile(wrapped))) == llama.config.hidden_size


@pytest.mark.parametrize("name", HIDDEN_SIZE_NAMES)
def test_hidden_size_reads_any_of_the_configs_width_names(name: str) -> None:
    model = UnknownLM()
    model.config = SimpleNamespace(**{name: 24})  # a config word beats the head's input width
    assert hidden_size(resolve_model_parts(model, head_path="unembed", **UNKNOWN_PATHS)) == 24


def test_hidden_size_of_a_multimodal_model_is_its_text_configs() -> None:
    model = UnknownLM()
    text = SimpleNamespace(hidden_size=24)
    model.config = SimpleNamespace(hidden_size=99, get_text_config=lambda: text)
    assert hidden_size(resolve_model_parts(model, head_path="unembed", **UNKNOWN_PATHS)) == 24


def test_without_a_config_the_hidden_size_is_the_heads_input_width() -> None:
    parts = resolve_model_parts(UnknownLM(), head_path="unembed", **UNKNOWN_PATHS)
    assert hidden_size(parts) == 8


def test_the_hidden_size_is_unknown_without_a_config_or_a_linear_head() -> None:
    model = UnknownLM()
    model.unembed = nn.Sequential(nn.Linear(8, 20))
    assert hidden_size(resolve_model_parts(model, head_path="unembed", **UNKNOWN_PATHS)) is None
