"""The two adapters behave the same at begin, step and end: same probe steps, same stop, same
records. Each only translates its framework's events into ``Runner`` calls."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.integrations.transformers import SpinalTrainerCallback

pl = pytest.importorskip("lightning.pytorch")

from spinal_callback.integrations.lightning import SpinalCallback  # noqa: E402
from tests.test_integration_lightning import TinyDPOModule, make_trainer, pair_batches  # noqa: E402


def run_both(
    make_model: Callable[..., PreTrainedModel],
    make_dpo_trainer: Callable[..., Any],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
    poison: bool = False,
) -> dict[str, Any]:
    """The same tiny model trained 6 steps by TRL and by Lightning, probing every 2 steps."""
    results: dict[str, Any] = {}
    for name in ("trl", "lightning"):
        torch.manual_seed(0)
        model = make_model("llama", layers=4)
        if poison:
            with torch.no_grad():
                model.model.layers[-1].mlp.down_proj.weight.fill_(float("nan"))
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        if name == "trl":
            callback: Any = SpinalTrainerCallback(every_n_steps=2, probe_texts=probe_texts)
            trainer = make_dpo_trainer(callback, max_steps=6, model=model)
            trainer.train()
            steps = trainer.state.global_step
            events = tmp_path / "run" / "runs" / "spinal" / "spinal_events.jsonl"
            saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
        else:
            callback = SpinalCallback(every_n_steps=2, probe_texts=probe_texts)
            trainer = make_trainer(tmp_path / "pl", [callback], max_steps=6)
            trainer.fit(TinyDPOModule(model, tokenizer), pair_batches())
            steps = trainer.global_step
            events = Path(trainer.logger.log_dir) / "spinal_events.jsonl"
            saved = sorted(p.name for p in (tmp_path / "pl").rglob("spinal-stop-*.ckpt"))
        records = [json.loads(line) for line in events.open()] if events.exists() else []
        results[name] = {
            "probes": [trace.step for trace in callback.traces],
            "steps": steps,
            "records": [(r["step"], r["rule"]) for r in records],
            "saved": saved,
            "unchanged": all(
                torch.equal(p.nan_to_num(), before[k].nan_to_num())
                for k, p in model.named_parameters()
            ),
        }
    return results


def test_both_adapters_probe_at_begin_every_n_steps_and_end(
    make_model: Callable[..., PreTrainedModel],
    make_dpo_trainer: Callable[..., Any],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    results = run_both(make_model, make_dpo_trainer, tokenizer, probe_texts, tmp_path)
    assert results["trl"]["probes"] == results["lightning"]["probes"] == [0, 2, 4, 6]
    assert results["trl"]["steps"] == results["lightning"]["steps"] == 6


def test_both_adapters_stop_at_the_first_probe_with_a_checkpoint_and_unchanged_weights(
    make_model: Callable[..., PreTrainedModel],
    make_dpo_trainer: Callable[..., Any],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    results = run_both(make_model, make_dpo_trainer, tokenizer, probe_texts, tmp_path, poison=True)
    for name, result in results.items():
        assert result["probes"] == [0], name
        assert result["records"][:2] == [(0, "non_finite"), (0, "training_stopped")], name
        assert result["saved"] and result["unchanged"], name
    # HF takes one (gradient-free) optimizer step before it looks at the stop; Lightning none.
    assert (results["trl"]["steps"], results["lightning"]["steps"]) == (1, 0)
