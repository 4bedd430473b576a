"""Two-process Lightning DDP (gloo, CPU) run of a tiny DPO module with ``SpinalCallback``.

Launched by ``tests/test_distributed.py`` as ``python tests/distributed/lightning_dpo_ddp_run.py
OUT_DIR``: Lightning's ``strategy="ddp"`` re-launches this script for the second process. Every
rank writes ``OUT_DIR/rank{r}.json``: its global rank, the steps it probed, whether it had a
TensorBoard board, where it wrote and the final global step. ``--fail-rank R --fail-from-step S``
makes every probe on rank R fail from step S on, so only that rank switches probing off.
"""

from __future__ import annotations

import argparse
import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.integrations.lightning import SpinalCallback
from spinal_callback.probe.spinal_probe import SpinalProbe
from tests.distributed.teardown import end_distributed_run


class TinyDPOModule(pl.LightningModule):
    """Policy ``model``, frozen ``reference``; sigmoid DPO loss on summed token log-probs."""

    def __init__(self, model: torch.nn.Module, beta: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        self.beta = beta

    def _logps(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            ref_chosen = self._logps(self.reference, batch["chosen"])
            ref_rejected = self._logps(self.reference, batch["rejected"])
        margin = (self._logps(self.model, batch["chosen"]) - ref_chosen) - (
            self._logps(self.model, batch["rejected"]) - ref_rejected
        )
        loss = -torch.nn.functional.logsigmoid(self.beta * margin).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)


def pair_batches(count: int = 16) -> torch.utils.data.DataLoader:
    """Batches of 4 pairs: the chosen reply repeats the last prompt token, the rejected does not."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, 300, (count, 4, 6), generator=generator)
    batches = [
        {
            "chosen": torch.cat([p, p[:, -1:]], 1),
            "rejected": torch.cat([p, (p[:, -1:] + 1) % 300], 1),
        }
        for p in prompts
    ]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def fail_probes_on_rank(rank: int, from_step: int) -> None:
    """Fault injection: every probe on ``rank`` at ``from_step`` or later raises."""
    original = SpinalProbe.run

    def run(self: SpinalProbe, step: int = 0) -> Any:
        if torch.distributed.get_rank() == rank and step >= from_step:
            raise RuntimeError(f"simulated probe failure on rank {rank}")
        return original(self, step)

    SpinalProbe.run = run  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-from-step", type=int, default=4)
    parser.add_argument("--collective-timeout", type=float, default=60.0)
    options = parser.parse_args()
    if options.fail_rank is not None:
        fail_probes_on_rank(options.fail_rank, options.fail_from_step)

    tokenizer = build_tiny_tokenizer()
    pl.seed_everything(0, verbose=False)
    module = TinyDPOModule(build_tiny_model("llama", vocab_size=len(tokenizer), layers=4).train())
    callback = SpinalCallback(
        tokenizer=tokenizer, probe_texts=list(DEFAULT_PROBE_TEXTS), every_n_steps=4
    )
    logger = TensorBoardLogger(str(options.out_dir), name="tb", version=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(
            process_group_backend="gloo",
            timeout=timedelta(seconds=options.collective_timeout),
        ),
        max_steps=options.max_steps,
        default_root_dir=str(options.out_dir),
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, pair_batches())
    board = callback.runner.outputs.board
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "probe_steps": [trace.step for trace in callback.traces],
        "transport_mean": [trace.summary["transport_mean"] for trace in callback.traces],
        "had_board": board is not None,
        "board_log_dir": getattr(board.writer, "log_dir", None) if board is not None else None,
        "logger_log_dir": logger.log_dir,
        "disabled": callback.runner.disabled,
        "global_step": trainer.global_step,
    }
    (options.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    end_distributed_run()


if __name__ == "__main__":
    main()
