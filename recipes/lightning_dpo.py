"""DPO in a compact LightningModule with spinal-callback, offline, on a tiny model or a checkpoint.

    python recipes/lightning_dpo.py                  # tiny Llama, synthetic task, ~300 steps
    python recipes/lightning_dpo.py --model PATH     # a local checkpoint (from_pretrained on PATH)

``DPOModule`` holds the policy at ``.model`` and a frozen copy at ``.reference`` (which
``SpinalCallback`` traces once as the baseline) and minimises the sigmoid DPO loss
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` on summed response-token log-probs.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from spinal_callback.integrations.lightning import SpinalCallback
from spinal_callback.loading import load_local_model, load_local_tokenizer
from spinal_callback.preference_data import tokenizer_corpus, train_eval_split
from spinal_callback.tiny import build_tiny_model, build_tiny_tokenizer


def collate_pairs(tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, Tensor]:
    """Tokenize prompt+chosen and prompt+rejected, right-padded, with response-token masks.

    Returns int64 ``[b, t]`` tensors ``{chosen,rejected}_{ids,attention,response}``; the
    response mask marks the reply tokens whose log-probs DPO sums.
    """
    batch: dict[str, Tensor] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for side in ("chosen", "rejected"):
        sequences, responses = [], []
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            reply = tokenizer(row[side], add_special_tokens=False)["input_ids"]
            sequences.append(prompt + reply)
            responses.append([0] * len(prompt) + [1] * len(reply))
        length = max(len(s) for s in sequences)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
        attention = torch.zeros((len(rows), length), dtype=torch.int64)
        response = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, (sequence, mask) in enumerate(zip(sequences, responses)):
            ids[i, : len(sequence)] = torch.tensor(sequence)
            attention[i, : len(sequence)] = 1
            response[i, : len(sequence)] = torch.tensor(mask)
        batch.update(
            {f"{side}_ids": ids, f"{side}_attention": attention, f"{side}_response": response}
        )
    return batch


def response_logps(model: nn.Module, ids: Tensor, attention: Tensor, response: Tensor) -> Tensor:
    """Summed log-probability (float32 ``[b]``) of the response tokens given everything before."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * response[:, 1:]).sum(dim=-1)


class DPOModule(pl.LightningModule):
    """Sigmoid DPO: policy ``model``, frozen ``reference``, inverse temperature ``beta``."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, beta: float = 0.1, learning_rate: float = 3e-3
    ) -> None:
        super().__init__()
        self.model = model
        self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.beta = beta
        self.learning_rate = learning_rate

    def _rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        rewards = []
        for side in ("chosen", "rejected"):
            args = (batch[f"{side}_ids"], batch[f"{side}_attention"], batch[f"{side}_response"])
            with torch.no_grad():
                reference = response_logps(self.reference, *args)
            rewards.append(self.beta * (response_logps(self.model, *args) - reference))
        return rewards[0], rewards[1]

    def _step(self, batch: dict[str, Tensor], prefix: str) -> Tensor:
        chosen, rejected = self._rewards(batch)
        loss = -nn.functional.logsigmoid(chosen - rejected).mean()
        self.log(f"{prefix}loss", loss, prog_bar=True)
        self.log(f"{prefix}rewards/accuracies", (chosen > rejected).float().mean(), prog_bar=True)
        self.log(f"{prefix}rewards/margins", (chosen - rejected).mean())
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "eval_")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="local checkpoint directory (default: a tiny random Llama)")
    parser.add_argument("--output-dir", default="runs/lightning_dpo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--every-n-steps", type=int, default=25, help="probe cadence")
    parser.add_argument("--no-spinal", action="store_true", help="train without the callback")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train; return the final logged metrics (train and held-out DPO accuracy and margin)."""
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    if args.model:
        policy, tokenizer = load_local_model(args.model), load_local_tokenizer(args.model)
    else:
        tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=320)
        policy = build_tiny_model(
            "llama", vocab_size=len(tokenizer), hidden=64, layers=4, seed=args.seed
        )
    train, held_out = train_eval_split(seed=args.seed)
    collate = partial(collate_pairs, tokenizer)
    train_loader = DataLoader(
        list(train), batch_size=args.batch_size, shuffle=True, collate_fn=collate
    )
    eval_loader = DataLoader(list(held_out), batch_size=64, collate_fn=collate)
    callbacks: list[pl.Callback] = []
    if not args.no_spinal:
        callbacks.append(
            SpinalCallback(probe_texts=held_out["prompt"][:32], every_n_steps=args.every_n_steps)
        )
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=args.steps,
        val_check_interval=50,
        log_every_n_steps=25,
        default_root_dir=args.output_dir,
        logger=pl.loggers.TensorBoardLogger(args.output_dir, name="tb"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        DPOModule(policy, tokenizer, args.beta, args.learning_rate), train_loader, eval_loader
    )
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = run(args)
    print(f"\nTensorBoard: tensorboard --logdir {args.output_dir}/tb")
    nan = float("nan")
    print(
        f"after {args.steps} steps: train rewards/accuracies "
        f"{metrics.get('rewards/accuracies', nan):.3f}, "
        f"held-out {metrics.get('eval_rewards/accuracies', nan):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
