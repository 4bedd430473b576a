"""A synthetic preference task that DPO learns from a random initialisation in minutes on a CPU.

Prompt: ``"say: w1 w2 w3"`` with words from ``WORDS``. The chosen reply repeats the prompt's
last word, the rejected reply is another word from the list. A tiny model learns the preference
from DPO alone in a few hundred steps, so the recipes, demo and benchmarks can train for real
without any download.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lamp", "ocean", "bread",
    "maple", "violin", "copper", "garden", "rocket", "pencil", "winter", "castle",
)  # fmt: skip
PROMPT_WORDS = 3


def make_preference_pairs(count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` pairs ``{"prompt", "chosen", "rejected"}``, deterministic for a seed.

    The chosen reply is the prompt's last word; the rejected one is a different word.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(PROMPT_WORDS)]
        wrong = rng.choice([w for w in WORDS if w != words[-1]])
        pairs.append(
            {
                "prompt": f"say: {' '.join(words)}",
                "chosen": f" {words[-1]}",
                "rejected": f" {wrong}",
            }
        )
    return pairs


def tokenizer_corpus() -> list[str]:
    """Texts to train the tiny tokenizer on, so every word of the task is a single token."""
    pairs = make_preference_pairs(512, seed=12345)
    return [pair["prompt"] + pair["chosen"] for pair in pairs] + [f"say: {w} {w}" for w in WORDS]


def train_eval_split(
    train_count: int = 2048, eval_count: int = 128, seed: int = 0
) -> tuple[Any, Any]:
    """Train and held-out ``datasets.Dataset``s drawn with different seeds (no shared rows)."""
    from datasets import Dataset

    train = make_preference_pairs(train_count, seed=seed)
    seen = {tuple(pair.values()) for pair in train}
    held_out = [
        p
        for p in make_preference_pairs(4 * eval_count, seed=seed + 10_000)
        if tuple(p.values()) not in seen
    ]
    return Dataset.from_list(train), Dataset.from_list(held_out[:eval_count])
