"""What both DPO recipes share: their command-line options, data, policy and final report."""

from __future__ import annotations

import argparse
import logging
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinal_callback.demos.preference_data import (
    TOKENIZER_VOCAB_SIZE,
    tokenizer_corpus,
    train_eval_split,
)
from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer
from spinal_callback.probe.loading import (
    checkpoint_directory,
    load_local_model,
    load_local_tokenizer,
)
from spinal_callback.tools.pairs import load_pairs

logger = logging.getLogger(__name__)

TINY_LEARNING_RATE = 3e-3
"""The random-initialised tiny model learns the synthetic task from DPO alone at this rate."""
PRETRAINED_LEARNING_RATE = 5e-7
"""Full DPO fine-tuning of a pretrained checkpoint: Zephyr's 5e-7 (the DPO paper used 1e-6).
At 3e-5 SmolLM2-135M already loses some language in 60 steps; at 3e-3 it is destroyed in 10."""
LORA_LEARNING_RATE = 5e-6
"""LoRA adapters start at zero and move a few weights, so they take about ten times the rate of
full fine-tuning."""
MAX_SAFE_PRETRAINED_RATE = 1e-4
"""Above this, the recipes warn that a pretrained checkpoint will likely be damaged."""
TINY_STEPS = 300
HELD_OUT_SHARE = 0.1
"""Share of the ``--pairs`` rows held out for evaluation and probing (grouped by prompt)."""
MAX_HELD_OUT = 256
"""At most this many held-out pairs: evaluation runs over all of them every ``--eval-steps``."""
SYNTHETIC_HELD_OUT = 128
PROBE_PROMPTS = 32


@dataclass
class RunOutcome:
    """What a recipe's run ends with.

    Attributes:
        metrics: the final DPO metrics, ``steps`` and (with the callback) ``spinal_metrics``.
        saved: what was written -> where, in the order to print it.
    """

    metrics: dict[str, float]
    saved: dict[str, str] = field(default_factory=dict)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends each option's default to its help.

    A flag shows ``(default: off)``. An option whose default is ``None`` depends on other options,
    so its help states the default itself (the tests check that it does).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "%(default)" in text or action.default is None:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def training_arguments(description: str | None, output_dir: str) -> argparse.ArgumentParser:
    """A parser with the options both recipes take; each recipe adds its own on top, then calls
    ``resolve_arguments``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="local checkpoint directory (save_pretrained output; nothing is downloaded). "
        "Default: a tiny random-initialised 4-block Llama, trained from scratch",
    )
    parser.add_argument(
        "--pairs",
        metavar="FILE.jsonl",
        help='your preference data: one {"prompt": ..., "chosen": ..., "rejected": ...} object '
        f"of strings per line. {round(100 * HELD_OUT_SHARE)}%% of the pairs (at most "
        f"{MAX_HELD_OUT}, whole prompts) are held out for evaluation; the probe texts are up to "
        f"{PROBE_PROMPTS} distinct prompts, held-out ones first. "
        "Default: the synthetic task (the chosen reply repeats the prompt's last word)",
    )
    parser.add_argument(
        "--output-dir",
        default=output_dir,
        help="where the TensorBoard logs, the event log, checkpoints and the final model "
        "(OUTPUT_DIR/final) go",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps. Default: {TINY_STEPS} on the synthetic task (one pass over "
        "fresh pairs), one epoch with --pairs",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="preference pairs per optimizer step"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=f"constant learning rate. Default: {_rate(TINY_LEARNING_RATE)} for the tiny model; "
        f"with --model {_rate(PRETRAINED_LEARNING_RATE)} for full fine-tuning (Zephyr's DPO "
        f"rate; the DPO paper and TRL use 1e-6) or {_rate(LORA_LEARNING_RATE)} with --lora "
        "(adapters start at zero and need about ten times more). The tiny model's rate "
        "destroyed SmolLM2-135M within 10 to 20 steps",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=0.2,
        help="DPO beta: how strongly the policy is held to the reference (higher: closer)",
    )
    parser.add_argument(
        "--eval-steps", type=int, default=50, help="evaluate on the held-out pairs every N steps"
    )
    parser.add_argument(
        "--every-n-steps",
        type=cadence,
        default=25,
        help="probe the late layers every N steps (and at step 0 and the end); 'auto': as "
        "often as 1%% of the run's time allows (overhead_budget)",
    )
    parser.add_argument(
        "--save-steps",
        type=int,
        default=0,
        help="also save a checkpoint every N steps (0: none). The callback saves one when it "
        "stops a run; resume from one saved before the first warning",
    )
    parser.add_argument(
        "--no-spinal", action="store_true", help="train without the callback (a baseline run)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the tiny model, the synthetic pairs, the held-out split and the data order",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads. Default: 1 for the tiny model (its matrices are too small to "
        "split, and on a busy machine two OpenMP threads waiting on each other made every step "
        "over twenty times slower); torch's own default with --model",
    )
    return parser


def _rate(value: float) -> str:
    """``3e-3`` rather than ``0.003`` or ``3e-03``."""
    return f"{value:.0e}".replace("e-0", "e-")


def resolve_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``argv``, check ``--model`` and ``--pairs`` before anything loads (a bad file ends in
    ``parser.error`` naming its line), and fill the defaults that depend on other options:
    ``learning_rate``, ``steps`` and ``threads``."""
    args = parser.parse_args(argv)
    _check_ranges(parser, args)
    try:
        if args.model:
            checkpoint_directory(args.model)
        train_count = len(preference_pairs(args)[0]) if args.pairs else None
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate(args.model, getattr(args, "lora", False))
    elif args.model and args.learning_rate > MAX_SAFE_PRETRAINED_RATE:
        logger.warning(
            "--learning-rate %g on a pretrained checkpoint will likely destroy it (DPO "
            "fine-tuning uses %g to %g); the run goes ahead as asked",
            args.learning_rate,
            PRETRAINED_LEARNING_RATE,
            LORA_LEARNING_RATE,
        )
    if args.steps is None:
        args.steps = TINY_STEPS if train_count is None else math.ceil(train_count / args.batch_size)
    if args.threads is None and not args.model:
        args.threads = 1
    return args


def cadence(text: str) -> int | str:
    """``--every-n-steps``: an int, or ``auto``."""
    if text.strip() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    minimums = {"steps": 1, "batch_size": 1, "eval_steps": 1, "every_n_steps": 1, "save_steps": 0}
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if isinstance(value, int) and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")


def default_learning_rate(model: str | None, lora: bool) -> float:
    """The rate a run gets without ``--learning-rate``: see ``TINY_LEARNING_RATE``,
    ``PRETRAINED_LEARNING_RATE`` and ``LORA_LEARNING_RATE``."""
    if not model:
        return TINY_LEARNING_RATE
    return LORA_LEARNING_RATE if lora else PRETRAINED_LEARNING_RATE


def preference_pairs(args: argparse.Namespace) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training and held-out rows ``{"prompt", "chosen", "rejected"}``: from ``--pairs``, or the
    synthetic task with ``steps * batch_size`` fresh training pairs (one epoch: a second pass
    over the same pairs over-optimizes, and the held-out chosen reply loses probability).

    Raises:
        FileNotFoundError, ValueError: ``--pairs`` is missing or malformed (the message names the
            line), or holds fewer than two distinct prompts.
    """
    if args.pairs:
        return split_pairs(load_pairs(args.pairs), args.seed, source=args.pairs)
    train, held_out = train_eval_split(
        train_count=args.steps * args.batch_size, eval_count=SYNTHETIC_HELD_OUT, seed=args.seed
    )
    return list(train), list(held_out)


def split_pairs(
    pairs: Sequence[dict[str, str]], seed: int, source: str = "the pairs"
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Hold out ``HELD_OUT_SHARE`` of ``pairs`` (at least one, at most ``MAX_HELD_OUT``), whole
    prompts at a time, so no held-out prompt is trained on. Deterministic per ``seed``."""
    counts = Counter(pair["prompt"] for pair in pairs)
    if len(counts) < 2:
        raise ValueError(
            f"{source} holds {len(pairs)} pair(s) with {len(counts)} distinct prompt(s); the "
            "recipe needs at least 2 distinct prompts, one to train on and one to hold out"
        )
    prompts = sorted(counts)
    random.Random(seed).shuffle(prompts)
    target = min(MAX_HELD_OUT, max(1, round(HELD_OUT_SHARE * len(pairs))))
    held: set[str] = set()
    for prompt in prompts[:-1]:  # the last prompt always stays in training
        if sum(counts[p] for p in held) >= target:
            break
        held.add(prompt)
    train = [pair for pair in pairs if pair["prompt"] not in held]
    return train, [pair for pair in pairs if pair["prompt"] in held]


def probe_prompts(train: Sequence[dict[str, str]], held_out: Sequence[dict[str, str]]) -> list[str]:
    """Up to ``PROBE_PROMPTS`` distinct prompts for the callback to probe, held-out ones first
    (a small ``--pairs`` file has few held-out prompts, and the probe needs enough tokens)."""
    prompts = dict.fromkeys(row["prompt"] for row in [*held_out, *train])
    return list(prompts)[:PROBE_PROMPTS]


def build_policy(args: argparse.Namespace) -> tuple[Any, Any]:
    """The policy and its tokenizer: a local checkpoint, or a tiny Llama trained from scratch."""
    if args.model:
        return load_local_model(args.model), load_local_tokenizer(args.model)
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)
    model = build_tiny_model(
        "llama", vocab_size=len(tokenizer), hidden=64, layers=4, seed=args.seed
    )
    return model, tokenizer


def spinal_metrics(callback: Any) -> dict[str, float]:
    """What the callback saw: the last trace's summaries as ``spinal/<name>``, its step as
    ``spinal/step``, and the alert counts as ``spinal/alerts`` and ``spinal/alerts/<level>``."""
    metrics: dict[str, float] = {}
    if callback.traces:
        final = callback.traces[-1]
        metrics["spinal/step"] = float(final.step)
        metrics.update({f"spinal/{name}": value for name, value in final.summary.items()})
    alerts = callback.runner.alerts
    metrics["spinal/alerts"] = float(len(alerts))
    for level in ("info", "warning", "critical"):
        metrics[f"spinal/alerts/{level}"] = float(sum(alert.level == level for alert in alerts))
    return metrics


def event_log_line(callback: Any) -> str:
    """Where the callback appended its alerts (one JSON object per line), and how many."""
    event_log = getattr(getattr(callback.runner, "outputs", None), "event_log", None)
    if event_log is None:
        return "none"
    count = len(callback.runner.alerts)
    if not Path(event_log.path).is_file():
        return f"{event_log.path} (not written: no alerts)"
    return f"{event_log.path} ({count} alert{'s' if count != 1 else ''})"


def print_report(
    summary: str, metrics: Mapping[str, float], saved: Mapping[str, str], steps: int
) -> None:
    """The end of a run, for a reader: the DPO summary, the last probe, the alert counts (as
    integers), and where every output went (``saved``: what -> where, in order)."""
    print(f"\n{summary}")
    if "spinal/step" in metrics:
        print(f"\nDepth trace at the last probe (step {int(metrics['spinal/step'])}):")
        for key, value in metrics.items():
            name = key.removeprefix("spinal/")
            if key.startswith("spinal/") and "/" not in name and name not in ("step", "alerts"):
                print(f"  {name:<20} {value:.3f}")
    if "spinal/alerts" in metrics:
        levels = ", ".join(
            f"{int(metrics.get(f'spinal/alerts/{level}', 0))} {level}"
            for level in ("critical", "warning", "info")
        )
        print(f"\nAlerts: {int(metrics['spinal/alerts'])} ({levels})")
    if "steps" in metrics and int(metrics["steps"]) < steps:
        print(f"Training stopped at step {int(metrics['steps'])} of {steps}: see the event log.")
    print("\nOutputs:")
    width = max(len(what) for what in saved)
    for what, where in saved.items():
        print(f"  {what:<{width}}  {where}")


def checkpoints_line(found: Sequence[Path], save_steps: int) -> str:
    """The checkpoints a run left, or why there are none."""
    if found:
        names = [path.name for path in found]
        shown = ", ".join(names if len(names) <= 3 else ["...", *names[-2:]])
        return f"{len(found)} in {found[0].parent}: {shown}"
    if save_steps > 0:
        return "none"
    return "none (--save-steps N saves one every N steps; a stop by the callback saves one)"
