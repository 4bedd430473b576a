"""Two-process (gloo, CPU) Lightning run of a tiny DPO module with ``SpinalCallback`` under
``DeepSpeedStrategy`` ZeRO-3 (``--zero 3``) or ``DDPStrategy`` (``--zero 0``, the run to compare
with).

Launched by ``tests/test_engines_deepspeed.py`` as ``python -m torch.distributed.run
--nproc_per_node=2 tests/distributed/deepspeed_lightning_run.py OUT_DIR --zero {0,3}``; Lightning
takes the ranks from torchrun. Every rank writes ``OUT_DIR/rank{r}.json``, as
``deepspeed_trainer_run.py`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer
from spinal_callback.integrations.lightning import SpinalCallback
from tests.distributed.deepspeed_common import (
    EVERY_N_STEPS,
    PROBE_TEXTS,
    engine_state,
    full_state_dict,
    trace_record,
    unsharded_trace,
    zero_config,
)
from tests.distributed.lightning_dpo_ddp_run import TinyDPOModule, pair_batches
from tests.distributed.teardown import end_distributed_run


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` without its CUDA-only checks (the accelerator's type, GPU indices
    matching local ranks), and with a CPU device that carries the local rank as its index, which
    the engine reads as its device rank: DeepSpeed's CPU accelerator runs ZeRO over gloo.
    Test-only."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class EngineStateAroundProbes(pl.Callback):
    """Listed once before and once after the spinal callback: the engine's state right before
    and right after each probe."""

    def __init__(self, spinal: SpinalCallback, states: list[dict[str, Any]], when: str):
        self.spinal, self.states, self.when = spinal, states, when
        self.engine = ""

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step % EVERY_N_STEPS == 0 and not self.spinal.runner.disabled:
            self.states.append({"step": step, "when": self.when, **engine_state(pl_module)})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The wrapper while training (teardown unwraps DDP's).
        self.engine = type(trainer.strategy.model).__name__
        self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        self._record(trainer, pl_module)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--zero", type=int, choices=[0, 3], default=3)
    parser.add_argument("--max-steps", type=int, default=4)
    options = parser.parse_args()

    tokenizer = build_tiny_tokenizer()

    def fresh_model() -> torch.nn.Module:
        return build_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=0)

    module = TinyDPOModule(fresh_model().train())
    initial, final = fresh_model(), fresh_model()
    spinal = SpinalCallback(
        tokenizer=tokenizer, probe_texts=PROBE_TEXTS, every_n_steps=EVERY_N_STEPS
    )
    states: list[dict[str, Any]] = []
    before = EngineStateAroundProbes(spinal, states, "before")
    after = EngineStateAroundProbes(spinal, states, "after")
    strategy: Strategy
    if options.zero:
        strategy = CPUDeepSpeedStrategy(
            config=zero_config(options.zero, micro_batch=4),
            process_group_backend="gloo",
        )
    else:
        strategy = DDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=options.max_steps,
        default_root_dir=str(options.out_dir),
        logger=False,
        callbacks=[before, spinal, after],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, pair_batches())

    probe = spinal.runner.probe
    assert probe is not None
    final.load_state_dict(full_state_dict(module.model))
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "engine": before.engine,
        "zero": options.zero,
        "global_step": trainer.global_step,
        "disabled": spinal.runner.disabled,
        "traces": [trace_record(trace) for trace in spinal.traces],
        "engine_states": states,
        "unsharded_initial": unsharded_trace(initial, probe, 0),
        "unsharded_final": unsharded_trace(final, probe, trainer.global_step),
    }
    (options.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    end_distributed_run()


if __name__ == "__main__":
    main()
