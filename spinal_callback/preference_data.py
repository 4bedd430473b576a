"""A synthetic preference task that DPO learns from a random initialisation in a minute on a CPU.

Prompt: ``"say: w1 w2 w3"`` with words from ``WORDS``. The chosen reply repeats the prompt's
last word (``" w3"``), the rejected reply is another word from the list. A tiny model learns the
preference from DPO alone in a few hundred steps, so the recipes, demo and benchmarks can train
for real without any download. Rows use TRL's standard (non-conversational) preference format.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lamp", "ocean", "bread",
    "maple", "violin", "copper", "garden", "rocket", "pencil", "winter", "castle",
)  # fmt: skip
PROMPT_WORDS = 3
# The smallest BPE vocabulary (trained on ``tokenizer_corpus()``) in which every word of ``WORDS``
# is one token, with or without its leading space; the trained tokenizer has 334 entries.
TOKENIZER_VOCAB_SIZE = 384


def make_preference_pairs(
    count: int,
    seed: int = 0,
    words: Sequence[str] = WORDS,
    prompt_words: int = PROMPT_WORDS,
) -> list[dict[str, str]]:
    """``count`` rows ``{"prompt", "chosen", "rejected"}``, the same for the same arguments.

    The prompt is ``"say: "`` and ``prompt_words`` words drawn with replacement from ``words``;
    the chosen reply is ``" " + last word``, the rejected one ``" " + another word``. Needs at
    least two distinct ``words``.
    """
    if len(set(words)) < 2 or prompt_words < 1:
        raise ValueError(
            f"need at least 2 distinct words and prompt_words >= 1, got {len(set(words))} "
            f"distinct words and prompt_words={prompt_words}"
        )
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        drawn = [rng.choice(words) for _ in range(prompt_words)]
        wrong = rng.choice([word for word in words if word != drawn[-1]])
        pairs.append(
            {
                "prompt": f"say: {' '.join(drawn)}",
                "chosen": f" {drawn[-1]}",
                "rejected": f" {wrong}",
            }
        )
    return pairs


def tokenizer_corpus() -> list[str]:
    """Texts to train the tiny tokenizer on; with ``vocab_size=TOKENIZER_VOCAB_SIZE`` every word
    of ``WORDS`` becomes a single token (a smaller vocabulary splits some words into pieces)."""
    pairs = make_preference_pairs(512, seed=12345)
    return [pair["prompt"] + pair["chosen"] for pair in pairs] + [f"say: {w} {w}" for w in WORDS]


def held_out_pairs(
    count: int, seed: int, exclude_prompts: Iterable[str], max_draws: int | None = None
) -> list[dict[str, str]]:
    """``count`` pairs drawn with ``seed`` whose prompts are not in ``exclude_prompts``.

    Raises ``ValueError`` when ``max_draws`` (default ``100 * count``) draws do not find enough:
    the training set then covers almost every one of the ``len(WORDS) ** PROMPT_WORDS`` prompts.
    """
    limit = max_draws if max_draws is not None else 100 * max(count, 1)
    rng = random.Random(seed)
    seen = set(exclude_prompts)
    found: list[dict[str, str]] = []
    for _ in range(limit):
        if len(found) == count:
            break
        pair = make_preference_pairs(1, seed=rng.getrandbits(64))[0]
        if pair["prompt"] not in seen:
            seen.add(pair["prompt"])
            found.append(pair)
    if len(found) == count:
        return found
    raise ValueError(
        f"found only {len(found)} of {count} held-out prompts unseen in training after {limit} "
        f"draws; ask for fewer training pairs (there are {len(WORDS) ** PROMPT_WORDS} prompts)"
    )


def train_eval_split(
    train_count: int = 2048, eval_count: int = 128, seed: int = 0
) -> tuple[Any, Any]:
    """Training pairs and held-out pairs whose prompts never occur in training.

    Returns two ``datasets.Dataset``s when ``datasets`` is installed (it is with TRL), else two
    lists of row dicts. The held-out prompts are distinct from each other too, so held-out
    accuracy measures the rule, not memorised prompts.
    """
    train = make_preference_pairs(train_count, seed=seed)
    held_out = held_out_pairs(eval_count, seed + 10_000, {pair["prompt"] for pair in train})
    try:
        from datasets import Dataset
    except ImportError:
        return train, held_out
    return Dataset.from_list(train), Dataset.from_list(held_out)
