"""Shared fixtures: a tiny tokenizer trained in memory, tiny models built from configs, DPO
trainers and set-up runners."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TrainerCallback

from spinal_callback.config import SpinalConfig
from spinal_callback.demos.preference_data import make_preference_pairs
from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.probe.spinal_probe import ProbeBatch
from spinal_callback.training.runner import Runner


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


@pytest.fixture
def make_dpo_trainer(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, make_model: Callable[..., PreTrainedModel]
) -> Callable[..., Any]:
    """A TRL ``DPOTrainer`` on 64 synthetic pairs (CPU, batch 8, logs every 4 steps, saves
    every 6) with ``callback`` last among its callbacks; the reference is a copy of the policy
    unless given (or PEFT provides it)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    def make(
        callback: Any,
        max_steps: int = 12,
        model: PreTrainedModel | None = None,
        ref_model: PreTrainedModel | None = None,
        output_dir: Path | None = None,
        peft_config: Any = None,
        extra_callbacks: list[TrainerCallback] | None = None,
        processing_class: Any = "default",
        **dpo_config: Any,
    ) -> Any:
        policy = model if model is not None else make_model("llama", layers=4)
        if ref_model is None and peft_config is None:
            ref_model = copy.deepcopy(policy)
        args = trl.DPOConfig(
            output_dir=str(output_dir or tmp_path / "run"),
            max_steps=max_steps,
            per_device_train_batch_size=8,
            logging_steps=4,
            save_steps=6,
            report_to=[],
            use_cpu=True,
            learning_rate=1e-3,
            disable_tqdm=True,
            **dpo_config,
        )
        return trl.DPOTrainer(
            model=policy,
            ref_model=ref_model,
            args=args,
            train_dataset=datasets.Dataset.from_list(make_preference_pairs(64)),
            processing_class=tokenizer if processing_class == "default" else processing_class,
            callbacks=[*(extra_callbacks or []), callback],
            peft_config=peft_config,
        )

    return make


@pytest.fixture
def make_runner(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> Callable[..., Runner]:
    """A set-up ``Runner`` of ``model`` on the default probe texts, probing every 2 steps unless
    ``fields`` say otherwise."""

    def make(model: torch.nn.Module, on_alert: Any = None, **fields: Any) -> Runner:
        config = SpinalConfig(**{"every_n_steps": 2, **fields})
        runner = Runner(config, probe_texts, on_alert=on_alert)
        runner.setup(model, tokenizer)
        return runner

    return make
