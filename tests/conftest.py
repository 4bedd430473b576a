"""Shared fixtures: a tiny tokenizer trained in memory and tiny models built from configs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.probe import ProbeBatch
from spinal_callback.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def probe_texts() -> list[str]:
    return list(DEFAULT_PROBE_TEXTS)


@pytest.fixture
def make_model(tokenizer: PreTrainedTokenizerFast) -> Callable[..., PreTrainedModel]:
    def make(architecture: str = "llama", **kwargs: int) -> PreTrainedModel:
        return build_tiny_model(architecture, vocab_size=len(tokenizer), **kwargs)

    return make


@pytest.fixture
def llama(make_model: Callable[..., PreTrainedModel]) -> PreTrainedModel:
    return make_model("llama")


@pytest.fixture
def probe_batch(tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]) -> ProbeBatch:
    return ProbeBatch.from_texts(tokenizer, probe_texts)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
