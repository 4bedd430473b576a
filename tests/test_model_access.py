"""Finding blocks, final norm and unembedding across architectures and wrappers."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from spinal_callback.model_access import ModelAccessError, resolve_model_parts, unwrap_model
from spinal_callback.tiny import TINY_ARCHITECTURES

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
