"""DPO with TRL's DPOTrainer and spinal-callback, offline, on a tiny model or a local checkpoint.

    python -m recipes.trl_dpo                        # tiny Llama, synthetic task, 300 steps
    python -m recipes.trl_dpo --lora                 # LoRA policy; reference = adapters disabled
    python -m recipes.trl_dpo --model PATH           # a local checkpoint, at lr 5e-7
    python -m recipes.trl_dpo --model PATH --pairs my_pairs.jsonl   # your own preference data
    python -m recipes.trl_dpo --no-spinal            # the same run without the callback

The synthetic task (``spinal_callback.demos.preference_data``): the chosen reply repeats the
prompt's last word. A random-initialised 4-block Llama learns it from DPO alone: train and held-out
``rewards/accuracies`` pass 0.9 within 100 steps; the 300-step run takes about 15 s on one core.

What it writes under OUTPUT_DIR: ``runs/`` (TensorBoard: TRL's scalars, and the callback's under
``runs/spinal``, with its event log ``runs/spinal/spinal_events.jsonl``), ``checkpoint-<step>/``
(every --save-steps, and when the callback stops the run) and ``final/``, the trained model and
its tokenizer (``save_pretrained``; with --lora the adapter, for ``spinal localize --tuned``).
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

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

DEFAULT_MAX_LENGTH = 1024
SUMMARY_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``argv=None`` reads ``sys.argv``."""
    return resolve_arguments(build_parser(), argv)


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options: ``training_arguments`` plus TRL's own."""
    parser = training_arguments(__doc__, "runs/trl_dpo")
    parser.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters (PEFT, rank 16, all linear layers); the reference is the "
        "model with its adapters disabled",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        help="longest prompt + reply in tokens; longer pairs are truncated. Default: 64 on the "
        f"synthetic task (its pairs are about 10 tokens), {DEFAULT_MAX_LENGTH} (TRL's) with "
        "--pairs",
    )
    return parser


def dpo_config(args: argparse.Namespace) -> Any:
    """A ``DPOConfig`` for a short run: constant learning rate, held-out evaluation, TensorBoard.

    TRL defaults to bf16 autocast and gradient checkpointing; on a CPU they only slow the tiny
    model down (by about a third), so bf16 is used only on a GPU that supports it and
    checkpointing only for a real checkpoint.
    """
    from trl import DPOConfig

    on_gpu = torch.cuda.is_available()
    saves = args.save_steps > 0
    return DPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=args.beta,
        max_length=max_length(args),
        logging_steps=max(1, min(25, args.steps // 4)),
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps" if saves else "no",
        save_steps=args.save_steps if saves else 500,
        report_to=["tensorboard"],
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=bool(args.model),
        use_cpu=not on_gpu,
        disable_tqdm=True,
        seed=args.seed,
    )


def max_length(args: argparse.Namespace) -> int:
    """``--max-length``, else 64 for the synthetic pairs (about 10 tokens) and TRL's default for
    ``--pairs``."""
    if args.max_length is not None:
        return int(args.max_length)
    return DEFAULT_MAX_LENGTH if args.pairs else 64


def spinal_callbacks(args: argparse.Namespace, probe_texts: list[str], reference: Any) -> list[Any]:
    """``[SpinalTrainerCallback]``, or ``[]`` with ``--no-spinal`` (then it is never imported)."""
    if args.no_spinal:
        return []
    from spinal_callback.integrations.transformers import SpinalTrainerCallback

    return [
        SpinalTrainerCallback(
            probe_texts=probe_texts, every_n_steps=args.every_n_steps, ref_model=reference
        )
    ]


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train; return the last logged train and eval DPO metrics (and the final depth trace's).

    Keys: those of ``SUMMARY_KEYS`` that were logged, ``first/loss`` (the first logged train
    loss), ``steps``, and with the callback on those of ``spinal_metrics``.
    """
    return train(args).metrics


def train(args: argparse.Namespace) -> RunOutcome:
    """Train, save the final model and tokenizer to ``OUTPUT_DIR/final``; the metrics of ``run``
    and what was written where."""
    from datasets import Dataset
    from trl import DPOTrainer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_rows, held_out = preference_pairs(args)
    policy, tokenizer = build_policy(args)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        # Low-rank adapters alone barely move a random model's frozen head; the tiny model
        # trains its head too (disabled with the adapters, so the reference stays the base).
        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules="all-linear",
            modules_to_save=None if args.model else ["lm_head"],
            task_type="CAUSAL_LM",
        )
    # TRL builds a reference itself only for models it loads from a name; ours is in memory.
    reference = None if args.lora else copy.deepcopy(policy).eval()
    probe_texts = probe_prompts(train_rows, held_out)
    callbacks = spinal_callbacks(args, probe_texts, reference)
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=dpo_config(args),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(held_out),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train()
    final = Path(args.output_dir) / "final"
    trainer.save_model(str(final))  # the tokenizer too (the trainer's processing class)
    metrics = final_metrics(trainer.state.log_history)
    metrics["steps"] = float(trainer.state.global_step)
    output = Path(args.output_dir)
    saved = {"TensorBoard": f"tensorboard --logdir {output / 'runs'}"}
    if callbacks:
        metrics.update(spinal_metrics(callbacks[0]))
        saved["event log"] = event_log_line(callbacks[0])
    weights = "LoRA adapter" if args.lora else "model"
    saved["final model"] = f"{final} ({weights} and tokenizer, save_pretrained)"
    found = sorted(output.glob("checkpoint-*"))
    saved["checkpoints"] = checkpoints_line(found, args.save_steps)
    return RunOutcome(metrics, saved)


def final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The last value of each ``SUMMARY_KEYS`` entry in a Trainer log history, plus
    ``first/loss``, the first logged train loss (so a caller can check that it fell)."""
    metrics: dict[str, float] = {}
    for record in history:
        if "loss" in record and "first/loss" not in metrics:
            metrics["first/loss"] = float(record["loss"])
        metrics.update({key: float(record[key]) for key in SUMMARY_KEYS if key in record})
    return metrics


def summary(metrics: dict[str, float], steps: int) -> str:
    """One paragraph on the final DPO metrics, for the end of a run."""
    nan = float("nan")

    def value(key: str) -> float:
        return metrics.get(key, nan)

    return (
        f"After {steps} steps the DPO loss (mean of each logging window) went from "
        f"{value('first/loss'):.3f} to {value('loss'):.3f}; train rewards/accuracies "
        f"{value('rewards/accuracies'):.3f} "
        f"(margin {value('rewards/margins'):.2f}); held-out rewards/accuracies "
        f"{value('eval_rewards/accuracies'):.3f} (margin {value('eval_rewards/margins'):.2f}, "
        f"loss {value('eval_loss'):.3f})."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe, then print a summary and where everything was written; the exit code."""
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    outcome = train(args)
    steps = int(outcome.metrics["steps"])
    print_report(summary(outcome.metrics, steps), outcome.metrics, outcome.saved, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
