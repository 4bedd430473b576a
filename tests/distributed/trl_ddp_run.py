"""Two-process DDP (gloo, CPU) TRL ``DPOTrainer`` run with ``SpinalTrainerCallback``.

Launched by ``tests/test_distributed.py`` as
``python -m torch.distributed.run --nproc_per_node=2 tests/distributed/trl_ddp_run.py OUT_DIR``.
Every rank writes ``OUT_DIR/rank{r}.json``: its rank, the steps it probed, whether it had a
TensorBoard writer and the final global step. ``--poison-rank R --poison-step S`` fills one late
weight of rank R's policy with inf at step S, so only that rank raises a critical alert.
``--recover`` sets ``on_critical="recover"``: every rank must rewind at the same step.
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
import trl
from transformers import TrainerCallback

from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.integrations.transformers import SpinalTrainerCallback
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


class PoisonWeightsOnRank(TrainerCallback):
    """Fault injection on one rank only: a late MLP weight becomes inf right after the optimizer
    update of step ``step``, before that step's probe (``on_optimizer_step`` runs before
    ``global_step`` is incremented), so the other rank's weights stay finite at that probe."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if state.global_step + 1 == self.step and dist.get_rank() == self.rank:
            with torch.no_grad():
                model.model.layers[-1].mlp.down_proj.weight.fill_(float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--poison-rank", type=int, default=None)
    parser.add_argument("--poison-step", type=int, default=3)
    parser.add_argument("--recover", action="store_true")
    options = parser.parse_args()

    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4)
    reference = copy.deepcopy(policy)
    recover = {"on_critical": "recover"} if options.recover else {}
    callback = SpinalTrainerCallback(
        every_n_steps=4, probe_texts=list(DEFAULT_PROBE_TEXTS), **recover
    )
    extra = []
    if options.poison_rank is not None:
        extra.append(PoisonWeightsOnRank(options.poison_rank, options.poison_step))
    args = trl.DPOConfig(
        output_dir=str(options.out_dir),
        max_steps=options.max_steps,
        per_device_train_batch_size=4,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        learning_rate=1e-3,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(preference_rows(64)),
        processing_class=tokenizer,
        callbacks=[*extra, callback],
    )
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else -1
    record = {
        "rank": rank,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "model_class": type(trainer.model_wrapped).__name__,
        "probe_steps": [trace.step for trace in callback.traces],
        "transport_mean": [trace.summary["transport_mean"] for trace in callback.traces],
        "had_board": callback.runner.outputs.board is not None,
        "run_id": callback.runner.run_id,
        "alerts": [[alert.step, alert.rule] for alert in callback.runner.alerts],
        "global_step": trainer.state.global_step,
        "recoveries": [[r.step, r.rewound_to, r.attempt] for r in callback.runner.recoveries],
        "weights": [p.detach().double().sum().item() for p in policy.parameters()],
        "learning_rate": trainer.optimizer.param_groups[0]["lr"],
    }
    (options.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    end_distributed_run()


if __name__ == "__main__":
    main()
