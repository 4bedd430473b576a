"""A short TRL DPO run with the callback, for fault tests that need a real broken filesystem
(run under ``unshare -rm`` with a tmpfs as the log directory).

    python -m tests.faults.trl_run LOG_DIR OUTPUT_DIR [EVENT_LOG]

Weights overflow after step 5, so there are alerts to write (``stop_on=None``: the run goes on).
Prints one JSON line: optimizer steps taken, probe steps, alert rules.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import datasets
import torch
import trl
from transformers import TrainerCallback

from spinal_callback.demos.preference_data import make_preference_pairs
from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.integrations.transformers import SpinalTrainerCallback


class PoisonAt(TrainerCallback):
    """Overwrite one late weight with inf after optimizer step ``step``: alerts to write."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.layers[-1].mlp.down_proj.weight.fill_(float("inf"))


def main(argv: list[str]) -> None:
    log_dir, output_dir = argv[0], argv[1]
    event_log = argv[2] if len(argv) > 2 else None
    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4)
    callback = SpinalTrainerCallback(
        every_n_steps=2,
        probe_texts=list(DEFAULT_PROBE_TEXTS),
        log_dir=log_dir,
        event_log=event_log,
        stop_on=None,
    )
    args = trl.DPOConfig(
        output_dir=output_dir,
        max_steps=8,
        per_device_train_batch_size=8,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=args,
        train_dataset=datasets.Dataset.from_list(make_preference_pairs(64)),
        processing_class=tokenizer,
        callbacks=[PoisonAt(5), callback],
    )
    trainer.train()
    result = {
        "steps": trainer.state.global_step,
        "probes": [trace.step for trace in callback.traces],
        "alerts": [alert.rule for alert in callback.alerts],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
