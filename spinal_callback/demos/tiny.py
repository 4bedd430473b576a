"""Tiny, offline models and tokenizers: the embedded default of ``spinal demo``, tests and benches.

Nothing here downloads anything: tokenizers are trained in memory on the built-in texts with the
``tokenizers`` library, and models are random-initialised from small configs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

DEFAULT_PROBE_TEXTS = (
    "The committee reviewed the proposal and asked for a clearer budget before the vote.",
    "Water boils at a lower temperature on a mountain because the air pressure is lower.",
    "She packed a map, two apples and a small torch before walking into the forest.",
    "To reset the router, hold the button on the back for ten seconds and wait.",
    "The old lighthouse keeper wrote a letter every evening to his sister in the city.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "If the train leaves at noon and travels for three hours, it arrives at three.",
    "Please summarise the meeting notes and send them to the whole team by Friday.",
    "A good apology names the mistake, takes responsibility and offers to make it right.",
    "The recipe needs flour, butter, sugar and eggs, mixed slowly and baked for an hour.",
    "Rivers carry sediment downstream and drop it where the current slows near the sea.",
    "He asked the assistant how to sort a list of numbers without using a library.",
    "Honest answers admit uncertainty instead of inventing facts that sound plausible.",
    "The museum opens at nine, closes at five and is free on the first Sunday of the month.",
    "Solar panels produce less power in winter because the days are short and the sun is low.",
    "Write a short poem about the quiet of a library on a rainy afternoon.",
)

_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
_TOKEN_IDS: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def build_tiny_tokenizer(
    texts: Sequence[str] = DEFAULT_PROBE_TEXTS, vocab_size: int = 384
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on ``texts`` (no download, ~10 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=_SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    bos = _SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **_SPECIAL_TOKENS)


def llama_like(config_class: Callable[..., PretrainedConfig]) -> Callable[..., PretrainedConfig]:
    """``build(vocab_size, hidden, layers, **extra)``: a tiny config of ``config_class`` (any
    architecture with Llama's config fields), 4 heads, 2 key-value heads, the tiny token ids."""

    def build(vocab_size: int, hidden: int, layers: int, **extra: Any) -> PretrainedConfig:
        return config_class(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **_TOKEN_IDS,
            **extra,
        )

    return build


def _gpt2(vocab_size: int, hidden: int, layers: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=512,
        **_TOKEN_IDS,
    )


def _gpt_neox(vocab_size: int, hidden: int, layers: int) -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        **_TOKEN_IDS,
    )


def _opt(vocab_size: int, hidden: int, layers: int) -> PretrainedConfig:
    return OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=hidden // 2,
        **_TOKEN_IDS,
    )


def _gemma2(vocab_size: int, hidden: int, layers: int) -> PretrainedConfig:
    return llama_like(Gemma2Config)(
        vocab_size, hidden, layers, head_dim=hidden // 4, final_logit_softcapping=30.0
    )


def _granite(vocab_size: int, hidden: int, layers: int) -> PretrainedConfig:
    """Granite divides its head's logits by ``logits_scaling`` (Cohere multiplies them by
    ``logit_scale``, 0.0625 by default): the lens must do the same."""
    return llama_like(GraniteConfig)(vocab_size, hidden, layers, logits_scaling=8.0)


TINY_ARCHITECTURES: dict[str, Callable[[int, int, int], PretrainedConfig]] = {
    "llama": llama_like(LlamaConfig),
    "mistral": llama_like(MistralConfig),
    "qwen2": llama_like(Qwen2Config),
    "qwen3": llama_like(Qwen3Config),
    "gemma2": _gemma2,
    "phi3": llama_like(Phi3Config),
    "cohere": llama_like(CohereConfig),
    "granite": _granite,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
}


def build_tiny_model(
    architecture: str = "llama",
    vocab_size: int = 384,
    hidden: int = 64,
    layers: int = 8,
    seed: int = 0,
) -> PreTrainedModel:
    """A random-initialised causal LM of one of ``TINY_ARCHITECTURES``, in eval mode, float32."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(
            f"unknown tiny architecture {architecture!r}; choose from {sorted(TINY_ARCHITECTURES)}"
        )
    config = TINY_ARCHITECTURES[architecture](vocab_size, hidden, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def llama_1b_config(vocab_size: int = 128256) -> LlamaConfig:
    """A Llama-3.2-1B-shaped config (16 blocks, width 2048, tied embeddings) for benchmarks;
    random-initialise it, there are no weights to download."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
