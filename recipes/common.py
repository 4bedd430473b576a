"""What both DPO recipes share: their command-line options and the policy they train."""

from __future__ import annotations

import argparse
from typing import Any

from spinal_callback.loading import load_local_model, load_local_tokenizer
from spinal_callback.preference_data import TOKENIZER_VOCAB_SIZE, tokenizer_corpus
from spinal_callback.tiny import build_tiny_model, build_tiny_tokenizer


def training_arguments(description: str | None, output_dir: str) -> argparse.ArgumentParser:
    """A parser with the options both recipes take; each recipe adds its own on top."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="local checkpoint directory (default: a tiny random Llama)")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.2)
    parser.add_argument("--eval-steps", type=int, default=50, help="held-out evaluation cadence")
    parser.add_argument("--every-n-steps", type=int, default=25, help="probe cadence")
    parser.add_argument("--no-spinal", action="store_true", help="train without the callback")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: the tiny model's matrices are too small to split, and on a busy machine two
    # OpenMP threads waiting on each other made every step over twenty times slower.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def build_policy(args: argparse.Namespace) -> tuple[Any, Any]:
    """The policy and its tokenizer: a local checkpoint, or a tiny Llama trained from scratch."""
    if args.model:
        return load_local_model(args.model), load_local_tokenizer(args.model)
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)
    model = build_tiny_model(
        "llama", vocab_size=len(tokenizer), hidden=64, layers=4, seed=args.seed
    )
    return model, tokenizer


def print_report(log_dir: object, summary: str, metrics: dict[str, float]) -> None:
    """The TensorBoard command, the recipe's summary and the final depth-trace summaries."""
    print(f"\nTensorBoard: tensorboard --logdir {log_dir}")
    print(summary)
    spinal = {k.removeprefix("spinal/"): v for k, v in metrics.items() if k.startswith("spinal/")}
    if spinal:
        print("Final depth trace: " + ", ".join(f"{k} {v:.3f}" for k, v in spinal.items()))
