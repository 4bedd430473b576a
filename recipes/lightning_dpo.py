"""DPO in a compact LightningModule with spinal-callback, offline, on a tiny model or a checkpoint.

    python -m recipes.lightning_dpo                  # tiny Llama, synthetic task, 300 steps
    python -m recipes.lightning_dpo --model PATH     # a local checkpoint (from_pretrained on PATH)
    python -m recipes.lightning_dpo --no-spinal      # the same run without the callback

``DPOModule`` holds the policy at ``.model`` and a frozen copy at ``.reference`` (which
``SpinalCallback`` traces once as the baseline) and minimises the sigmoid DPO loss
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` on summed response-token log-probs.
It logs ``train/loss``, ``rewards/accuracies`` and ``rewards/margins`` every step and the same
on the held-out pairs as ``eval/loss``, ``eval/rewards/accuracies``, ``eval/rewards/margins``.
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.utils.data import DataLoader

from recipes.common import build_policy, print_report, training_arguments
from spinal_callback.pairs import KEYS, SIDES, collate_pairs, response_logps
from spinal_callback.preference_data import train_eval_split


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Sigmoid DPO on summed log-probs ``[2b]`` (chosen pairs first, then rejected).

    Returns the scalar loss (``ln 2`` where policy and reference agree) and the ``[b]`` reward
    margins ``beta * ((pi_c - ref_c) - (pi_r - ref_r))``.
    """
    rewards = beta * (policy - reference)
    margins = rewards[: len(rewards) // 2] - rewards[len(rewards) // 2 :]
    return -nn.functional.logsigmoid(margins).mean(), margins


class DPOModule(pl.LightningModule):
    """Sigmoid DPO: policy ``model``, frozen ``reference`` (a copy unless given), ``beta``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        beta: float = 0.2,
        learning_rate: float = 3e-3,
        reference: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model.train()
        reference = copy.deepcopy(model) if reference is None else reference
        self.reference = reference.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.beta = beta
        self.learning_rate = learning_rate

    def train(self, mode: bool = True) -> DPOModule:
        """Switch the policy's mode; the reference stays in eval mode (no dropout)."""
        super().train(mode)
        self.reference.eval()
        return self

    def _sequence_logps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Policy and reference log-probs ``[2b]``, chosen then rejected, in one forward each."""
        args = [torch.cat([batch[f"{side}_{k}"] for side in SIDES]) for k in KEYS]
        with torch.no_grad():
            reference = response_logps(self.reference, *args)
        return response_logps(self.model, *args), reference

    def _step(self, batch: dict[str, Tensor], prefix: str) -> Tensor:
        loss, margins = dpo_loss(*self._sequence_logps(batch), self.beta)
        metrics = {
            f"{prefix or 'train/'}loss": loss,
            f"{prefix}rewards/accuracies": (margins > 0).float().mean(),
            f"{prefix}rewards/margins": margins.mean(),
        }
        self.log_dict(metrics, prog_bar=True, batch_size=len(margins))
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "eval/")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=0.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``argv=None`` reads ``sys.argv``."""
    parser = training_arguments(__doc__, "runs/lightning_dpo")
    parser.add_argument("--accelerator", default="cpu", help='Lightning accelerator ("auto": GPU)')
    return parser.parse_args(argv)


def spinal_callbacks(args: argparse.Namespace, probe_texts: list[str]) -> list[pl.Callback]:
    """``[SpinalCallback]``, or ``[]`` with ``--no-spinal`` (then it is never imported)."""
    if args.no_spinal:
        return []
    from spinal_callback.integrations.lightning import SpinalCallback

    return [SpinalCallback(probe_texts=probe_texts, every_n_steps=args.every_n_steps)]


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train; return the final logged metrics: the last step's ``train/loss``,
    ``rewards/accuracies``, ``rewards/margins``, the last held-out evaluation's ``eval/...``,
    and with the callback on the final trace's ``spinal/<summary>`` and ``spinal/alerts``."""
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    policy, tokenizer = build_policy(args)
    # One epoch: a second pass over the same pairs over-optimizes (the held-out chosen reply
    # loses probability), which is a failure the monitor rightly reports.
    train, held_out = train_eval_split(train_count=args.steps * args.batch_size, seed=args.seed)
    collate = partial(collate_pairs, tokenizer)
    train_loader = DataLoader(
        list(train), batch_size=args.batch_size, shuffle=True, collate_fn=collate
    )
    eval_loader = DataLoader(list(held_out), batch_size=64, collate_fn=collate)
    callbacks = spinal_callbacks(args, [row["prompt"] for row in held_out][:32])
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        gradient_clip_val=1.0,  # as the HF Trainer under TRL does
        val_check_interval=args.eval_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        default_root_dir=args.output_dir,
        logger=pl.loggers.TensorBoardLogger(args.output_dir, name="tb"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = DPOModule(policy, tokenizer, args.beta, args.learning_rate)
    with warnings.catch_warnings():
        # The frozen reference is in eval mode on purpose; Lightning warns about any such module.
        warnings.filterwarnings(
            "ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning
        )
        trainer.fit(module, train_loader, eval_loader)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    metrics["steps"] = float(trainer.global_step)
    for callback in callbacks:
        if callback.traces:
            final = callback.traces[-1].summary
            metrics.update({f"spinal/{name}": value for name, value in final.items()})
        metrics["spinal/alerts"] = float(len(callback.runner.alerts))
    return metrics


def summary(metrics: dict[str, float], steps: int) -> str:
    """One paragraph on the final DPO metrics, for the end of a run."""
    keys = ("loss", "rewards/accuracies", "rewards/margins")
    loss, accuracy, margin = (metrics.get(k, math.nan) for k in ("train/loss", *keys[1:]))
    eval_loss, eval_accuracy, eval_margin = (metrics.get(f"eval/{k}", math.nan) for k in keys)
    return (
        f"After {steps} steps the DPO loss is {loss:.3f} on the last batch ({math.log(2):.3f} = "
        f"ln 2 at the start), with rewards/accuracies {accuracy:.3f} (margin {margin:.2f}); "
        f"held-out rewards/accuracies {eval_accuracy:.3f} (margin {eval_margin:.2f}, "
        f"loss {eval_loss:.3f})."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe and print the TensorBoard command and a summary; returns the exit code."""
    args = parse_args(argv)
    metrics = run(args)
    print_report(f"{args.output_dir}/tb", summary(metrics, int(metrics["steps"])), metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
