"""Two-process (gloo, CPU) HF ``Trainer`` or TRL ``DPOTrainer`` run with ``SpinalTrainerCallback``
under DeepSpeed ZeRO (``--zero 2`` or ``3``) or plain DDP (``--zero 0``, the runs to compare with).

Launched by ``tests/test_engines_deepspeed.py`` as ``python -m torch.distributed.run
--nproc_per_node=2 tests/distributed/deepspeed_trainer_run.py OUT_DIR --trainer {trl,hf} --zero
{0,2,3}``. Every rank writes ``OUT_DIR/rank{r}.json``: the callback's traces; the engine's state
right after each probe (``deepspeed_common.engine_state``); and, as references, the traces of two
unsharded models under the same probe: the initial weights (same seed) and the trained weights
gathered at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer
from spinal_callback.integrations.transformers import SpinalTrainerCallback
from tests.distributed.deepspeed_common import (
    EVERY_N_STEPS,
    PROBE_TEXTS,
    engine_state,
    full_state_dict,
    trace_record,
    unsharded_trace,
    zero_config,
)
from tests.distributed.teardown import end_distributed_run

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "ocean", "bread"]


def preference_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = [rng.choice(WORDS) for _ in range(3)]
        other = rng.choice([w for w in WORDS if w != prompt[-1]])
        rows.append(
            {"prompt": "say: " + " ".join(prompt), "chosen": " " + prompt[-1], "rejected": other}
        )
    return rows


def language_rows(tokenizer: Any, count: int, length: int = 12) -> list[dict[str, list[int]]]:
    """Fixed-length causal-LM rows for the plain ``Trainer``."""
    rows = []
    for row in preference_rows(count):
        ids = tokenizer(row["prompt"] + row["chosen"])["input_ids"][:length]
        ids = ids + [ids[-1]] * (length - len(ids))
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


class EngineStateAroundProbes(TrainerCallback):
    """Listed once before and once after the spinal callback: records the engine's state right
    before and right after each probe."""

    def __init__(self, spinal: SpinalTrainerCallback, states: list[dict[str, Any]], when: str):
        self.spinal, self.states, self.when = spinal, states, when

    def _record(self, state: Any, model: Any) -> None:
        step = state.global_step
        probing = step % EVERY_N_STEPS == 0 and not self.spinal.runner.disabled
        if probing:
            self.states.append({"step": step, "when": self.when, **engine_state(model)})

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(state, kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(state, kwargs["model"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--trainer", choices=["trl", "hf"], default="trl")
    parser.add_argument("--zero", type=int, choices=[0, 2, 3], default=3)
    parser.add_argument("--max-steps", type=int, default=4)
    options = parser.parse_args()

    tokenizer = build_tiny_tokenizer()

    def fresh_model() -> torch.nn.Module:
        return build_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=0)

    # Built before the training arguments: once they name a ZeRO-3 config, transformers
    # partitions every model built from a config (zero.Init).
    policy, initial, final = fresh_model(), fresh_model(), fresh_model()
    reference = copy.deepcopy(policy) if options.trainer == "trl" else None
    # TRL's reference gets an engine of its own (ZeRO-3: partitioned, inference only); the
    # callback traces it once, as the baseline.
    spinal = SpinalTrainerCallback(
        every_n_steps=EVERY_N_STEPS, probe_texts=PROBE_TEXTS, ref_model=reference
    )
    states: list[dict[str, Any]] = []
    watchers = [
        EngineStateAroundProbes(spinal, states, "before"),
        spinal,
        EngineStateAroundProbes(spinal, states, "after"),
    ]
    common: dict[str, Any] = {
        "output_dir": str(options.out_dir),
        "max_steps": options.max_steps,
        "per_device_train_batch_size": 4,
        "logging_steps": EVERY_N_STEPS,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "ddp_backend": "gloo",
        "learning_rate": 1e-3,
        "bf16": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "deepspeed": zero_config(options.zero) if options.zero else None,
    }
    trainer: Trainer
    if options.trainer == "trl":
        import trl

        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=reference,
            args=trl.DPOConfig(**common),
            train_dataset=datasets.Dataset.from_list(preference_rows(64)),
            processing_class=tokenizer,
            callbacks=watchers,
        )
    else:
        trainer = Trainer(
            model=policy,
            args=TrainingArguments(**common),
            train_dataset=datasets.Dataset.from_list(language_rows(tokenizer, 64)),
            data_collator=default_data_collator,
            processing_class=tokenizer,
            callbacks=watchers,
        )
    trainer.train()

    probe = spinal.runner.probe
    assert probe is not None
    final.load_state_dict(full_state_dict(trainer.model))
    rank = dist.get_rank()
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "engine": type(trainer.model_wrapped).__name__,
        "zero": options.zero,
        "global_step": trainer.state.global_step,
        "disabled": spinal.runner.disabled,
        "traces": [trace_record(trace) for trace in spinal.traces],
        "reference_trace": None
        if spinal.runner.reference is None
        else trace_record(spinal.runner.reference),
        "engine_states": states,
        "unsharded_initial": unsharded_trace(initial, probe, 0),
        "unsharded_final": unsharded_trace(final, probe, trainer.state.global_step),
    }
    (options.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    end_distributed_run()


if __name__ == "__main__":
    main()
