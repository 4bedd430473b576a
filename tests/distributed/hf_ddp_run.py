"""Run under torchrun: a tiny TRL DPO run on 2 CPU processes (gloo) with SpinalTrainerCallback.

argv: OUTPUT_DIR [STOP_ON_RANK_1_AT_STEP]. Each rank writes rank<k>.json with the probe steps it
ran, whether it had a TensorBoard board, the alerts it saw and the step training ended at. With a
stop step, rank 1 alone sees a non-finite trace there (a one-rank trigger).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from trl import DPOConfig, DPOTrainer

from spinal_callback.integrations.transformers import SpinalTrainerCallback
from spinal_callback.preference_data import tokenizer_corpus, train_eval_split
from spinal_callback.probe import SpinalProbe
from spinal_callback.tiny import build_tiny_model, build_tiny_tokenizer


def poison_rank_one_at(step: int) -> None:
    original = SpinalProbe.run

    def run(self: SpinalProbe, at: int = 0):  # type: ignore[no-untyped-def]
        trace = original(self, at)
        if dist.get_rank() == 1 and at == step:
            trace.contraction[0] = float("nan")
        return trace

    SpinalProbe.run = run  # type: ignore[method-assign]


def main() -> None:
    output = Path(sys.argv[1])
    if len(sys.argv) > 2:
        poison_rank_one_at(int(sys.argv[2]))
    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=320)
    model = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4)
    train, _ = train_eval_split(train_count=256, eval_count=16)
    alerts: list[dict] = []
    callback = SpinalTrainerCallback(
        every_n_steps=2,
        probe_texts=train["prompt"][:16],
        on_alert=lambda a: alerts.append(a.to_dict()),
    )
    args = DPOConfig(
        output_dir=str(output),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    record = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "probe_steps": [trace.step for trace in callback.traces],
        "had_board": callback.session.board is not None,
        "alerts": alerts,
        "final_step": trainer.state.global_step,
    }
    (output / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
