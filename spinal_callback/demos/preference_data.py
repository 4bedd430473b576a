"""Synthetic preference tasks DPO learns on a CPU in a minute, and neutral text of their domain.

The default task (``make_preference_pairs``, the recipes' and the demo's): the prompt is
``"say: w1 w2 w3"`` with words from ``WORDS``; the chosen reply repeats the prompt's last word
(``" w3"``), the rejected reply is another word. A tiny model learns the preference from DPO alone
in a few hundred steps, so the recipes, demo and benchmarks train for real without any download.

``TASKS`` holds that task and three of other shapes over the same words: multi-token replies
that differ in one word (``copy``), replies that differ in order (``reverse``) and replies of
different lengths in both directions (``lengths``). ``neutral_sentences`` is text of the same
domain that is not preference data: sentences of a small grammar over the same words, in which
each word has a fixed partner (``PARTNER``), so a language model can learn it and a damaged one
forgets it. Rows use TRL's standard (non-conversational) preference format.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lamp", "ocean", "bread",
    "maple", "violin", "copper", "garden", "rocket", "pencil", "winter", "castle",
)  # fmt: skip
PROMPT_WORDS = 3
FUNCTION_WORDS = ("the", "a", "is", "near", "under", "and", "saw", "has", "big", "old", "red", ".")
PARTNER = {word: WORDS[(i * 5 + 3) % len(WORDS)] for i, word in enumerate(WORDS)}
"""Each word's fixed partner in the neutral grammar ("the apple is near the cloud .")."""
# A BPE vocabulary (trained on ``tokenizer_corpus()``) in which every word of ``WORDS`` and
# ``FUNCTION_WORDS`` is one token after a space; the trained tokenizer has 370 entries.
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
    of ``WORDS`` and ``FUNCTION_WORDS`` after a space becomes a single token."""
    pairs = make_preference_pairs(512, seed=12345)
    texts = [pair["prompt"] + pair["chosen"] for pair in pairs] + [f"say: {w} {w}" for w in WORDS]
    for task in TASKS.values():
        texts += [row["prompt"] + row["chosen"] for row in task.make_pairs(64, 12345)]
    return texts + neutral_sentences(256, seed=12345)


def neutral_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences of the tasks' domain that are not preference data.

    A small grammar over ``WORDS``: ``"the apple is near the cloud ."``, ``"a big tiger saw the
    red river ."``, ``"the lamp has a stone and a maple ."``. Each word is placed ``near`` or
    ``under`` its fixed ``PARTNER`` only, so the text has structure a model learns and forgets.
    """
    rng = random.Random(seed)
    adjectives = ("big", "old", "red")
    templates: tuple[Callable[[], str], ...] = (
        lambda: (lambda w: f"the {w} is {rng.choice(('near', 'under'))} the {PARTNER[w]} .")(
            rng.choice(WORDS)
        ),
        lambda: (
            f"a {rng.choice(adjectives)} {rng.choice(WORDS)} saw the "
            f"{rng.choice(adjectives)} {rng.choice(WORDS)} ."
        ),
        lambda: f"the {rng.choice(WORDS)} has a {rng.choice(WORDS)} and a {rng.choice(WORDS)} .",
    )
    return [rng.choice(templates)() for _ in range(count)]


@dataclass(frozen=True)
class Task:
    """A synthetic preference task: a name and a deterministic pair generator.

    Attributes:
        name: the task's name in ``TASKS``.
        describe: what the chosen reply does, in a few words.
        make_pairs: ``(count, seed) -> rows {"prompt", "chosen", "rejected"}``, the same rows for
            the same arguments.
    """

    name: str
    describe: str
    make_pairs: Callable[[int, int], list[dict[str, str]]]

    def split(self, train_count: int, eval_count: int, seed: int) -> tuple[list[Any], list[Any]]:
        """Training rows and held-out rows whose prompts never occur in training."""
        train = self.make_pairs(train_count, seed)
        seen = {row["prompt"] for row in train}
        held_out: list[dict[str, str]] = []
        for row in self.make_pairs(50 * eval_count, seed + 10_000):
            if row["prompt"] not in seen and len(held_out) < eval_count:
                seen.add(row["prompt"])
                held_out.append(row)
        if len(held_out) < eval_count:
            raise ValueError(
                f"task {self.name!r}: only {len(held_out)} of {eval_count} held-out prompts are "
                "unseen in training; ask for fewer training pairs"
            )
        return train, held_out


def _pairs(build: Callable[[random.Random], tuple[str, str, str]]) -> Callable[..., Any]:
    def make(count: int, seed: int = 0) -> list[dict[str, str]]:
        rng = random.Random(seed)
        rows = []
        for _ in range(count):
            prompt, chosen, rejected = build(rng)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return rows

    return make


def _distinct(rng: random.Random, count: int) -> list[str]:
    return rng.sample(list(WORDS), count)


def _copy(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(WORDS) for _ in range(PROMPT_WORDS)]
    wrong = list(words)
    at = rng.randrange(len(words))
    wrong[at] = rng.choice([w for w in WORDS if w != words[at]])
    return f"copy: {' '.join(words)}", f" {' '.join(words)} .", f" {' '.join(wrong)} ."


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _distinct(rng, PROMPT_WORDS)
    backwards = " ".join(reversed(words))
    return f"reverse: {' '.join(words)}", f" {backwards} .", f" {' '.join(words)} ."


def _lengths(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        words = [rng.choice(WORDS) for _ in range(PROMPT_WORDS + 1)]
        return f"first: {' '.join(words)}", f" {words[0]} .", f" {' '.join(words)} ."
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, PROMPT_WORDS + 1))]
    return f"all: {' '.join(words)}", f" {' '.join(words)} .", f" {words[0]} ."


TASKS: dict[str, Task] = {
    "repeat": Task("repeat", "one-token reply: the prompt's last word", make_preference_pairs),
    "copy": Task("copy", "multi-token reply: the prompt's words, not one of them changed",
                 _pairs(_copy)),
    "reverse": Task("reverse", "multi-token reply: the prompt's words in reverse order",
                    _pairs(_reverse)),
    "lengths": Task("lengths", "replies of different lengths: the first word, or all words",
                    _pairs(_lengths)),
}  # fmt: skip


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
