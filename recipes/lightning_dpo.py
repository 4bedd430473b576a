"""DPO in a compact LightningModule with spinal-callback, offline, on a tiny model or a checkpoint.

    python -m recipes.lightning_dpo                  # tiny Llama, synthetic task, 300 steps
    python -m recipes.lightning_dpo --model PATH     # a local checkpoint, at lr 5e-7
    python -m recipes.lightning_dpo --model PATH --pairs my_pairs.jsonl   # your own data
    python -m recipes.lightning_dpo --no-spinal      # the same run without the callback

``DPOModule`` holds the policy at ``.model`` and a frozen copy at ``.reference`` (which
``SpinalCallback`` traces once as the baseline) and minimises the sigmoid DPO loss
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` on summed response-token log-probs.
It logs ``train/loss``, ``rewards/accuracies`` and ``rewards/margins`` every step and the same
on the held-out pairs as ``eval/loss``, ``eval/rewards/accuracies``, ``eval/rewards/margins``.

What it writes under OUTPUT_DIR: ``tb/version_<n>/`` (TensorBoard: the module's scalars and the
callback's, with its event log ``spinal_events.jsonl``), ``checkpoints/`` (Lightning checkpoints
every --save-steps, and ``spinal-stop-step=<step>.ckpt`` when the callback stops the run) and
``final/``, the trained policy and its tokenizer (``save_pretrained``).
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.utils.data import DataLoader

from recipes.common import (
    RunOutcome,
    build_policy,
    checkpoints_line,
    event_log_line,
    preference_pairs,
    print_report,
    probe_prompts,
    resolve_arguments,
    spinal_metrics,
    training_arguments,
)
from spinal_callback.tools.pairs import KEYS, SIDES, collate_pairs, response_logps


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
    return resolve_arguments(build_parser(), argv)


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options: ``training_arguments`` plus Lightning's own."""
    parser = training_arguments(__doc__, "runs/lightning_dpo")
    parser.add_argument(
        "--accelerator", default="cpu", help='Lightning accelerator ("auto" takes a GPU if any)'
    )
    return parser


def spinal_callbacks(args: argparse.Namespace, probe_texts: list[str]) -> list[pl.Callback]:
    """``[SpinalCallback]``, or ``[]`` with ``--no-spinal`` (then it is never imported)."""
    if args.no_spinal:
        return []
    from spinal_callback.integrations.lightning import SpinalCallback

    return [SpinalCallback(probe_texts=probe_texts, every_n_steps=args.every_n_steps)]


def pair_loader(rows: list[dict[str, str]], tokenizer: Any, **options: Any) -> DataLoader[Any]:
    """Batches of ``collate_pairs`` over ``rows`` (a list is a map-style dataset to torch)."""
    dataset: Any = rows
    return DataLoader(dataset, collate_fn=partial(collate_pairs, tokenizer), **options)


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train; return the final logged metrics: the last step's ``train/loss``,
    ``rewards/accuracies``, ``rewards/margins``, the last held-out evaluation's ``eval/...``,
    ``steps``, and with the callback on those of ``spinal_metrics``."""
    return train(args).metrics


def train(args: argparse.Namespace) -> RunOutcome:
    """Train, save the policy and tokenizer to ``OUTPUT_DIR/final``; the metrics of ``run`` and
    what was written where."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    train_rows, held_out = preference_pairs(args)
    policy, tokenizer = build_policy(args)
    train_loader = pair_loader(train_rows, tokenizer, batch_size=args.batch_size, shuffle=True)
    eval_loader = pair_loader(held_out, tokenizer, batch_size=64)
    probe_texts = probe_prompts(train_rows, held_out)
    callbacks = spinal_callbacks(args, probe_texts)
    output = Path(args.output_dir)
    checkpointing: list[pl.Callback] = []
    if args.save_steps > 0:
        checkpointing.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=output / "checkpoints", every_n_train_steps=args.save_steps, save_top_k=-1
            )
        )
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
        callbacks=[*checkpointing, *callbacks],
        enable_checkpointing=bool(checkpointing),
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
    final = output / "final"
    policy.save_pretrained(final)  # the module trained this very object
    tokenizer.save_pretrained(final)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    metrics["steps"] = float(trainer.global_step)
    saved = {"TensorBoard": f"tensorboard --logdir {output / 'tb'}"}
    for callback in callbacks:
        metrics.update(spinal_metrics(callback))
        saved["event log"] = event_log_line(callback)
    saved["final model"] = f"{final} (policy and tokenizer, save_pretrained)"
    found = sorted((output / "checkpoints").glob("*.ckpt"))
    saved["checkpoints"] = checkpoints_line(found, args.save_steps)
    return RunOutcome(metrics, saved)


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
    """Run the recipe, then print a summary and where everything was written; the exit code."""
    args = parse_args(argv)
    outcome = train(args)
    steps = int(outcome.metrics["steps"])
    print_report(summary(outcome.metrics, steps), outcome.metrics, outcome.saved, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
