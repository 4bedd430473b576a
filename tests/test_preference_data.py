"""The synthetic preference tasks and the neutral sentences of their domain."""

from __future__ import annotations

import pytest

from spinal_callback.demos.preference_data import (
    PARTNER,
    TASKS,
    TOKENIZER_VOCAB_SIZE,
    WORDS,
    neutral_sentences,
    tokenizer_corpus,
)
from spinal_callback.demos.tiny import build_tiny_tokenizer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_deterministic_and_its_replies_differ(name: str) -> None:
    task = TASKS[name]
    rows = task.make_pairs(200, 7)
    assert rows == task.make_pairs(200, 7)
    assert rows != task.make_pairs(200, 8)
    assert all(row["chosen"] != row["rejected"] for row in rows)
    assert all(row["chosen"].startswith(" ") and row["rejected"].startswith(" ") for row in rows)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_held_out_prompts_never_occur_in_training(name: str) -> None:
    train, held_out = TASKS[name].split(400, 32, seed=3)
    assert len(train) == 400 and len(held_out) == 32
    prompts = [row["prompt"] for row in held_out]
    assert len(set(prompts)) == 32
    assert not set(prompts) & {row["prompt"] for row in train}


def test_the_tasks_have_different_shapes() -> None:
    reply_words = {
        name: {len(row["chosen"].split()) for row in task.make_pairs(100, 0)}
        for name, task in TASKS.items()
    }
    assert reply_words["repeat"] == {1}
    assert len(reply_words["copy"]) == 1 and next(iter(reply_words["copy"])) > 2
    assert len(reply_words["lengths"]) > 2


def test_neutral_sentences_are_deterministic_domain_text_and_not_preference_data() -> None:
    sentences = neutral_sentences(300, seed=4)
    assert sentences == neutral_sentences(300, seed=4)
    assert all(sentence.endswith(" .") for sentence in sentences)
    assert not any(":" in sentence for sentence in sentences)
    places = [s.split() for s in sentences if " is near the " in s or " is under the " in s]
    assert places and all(PARTNER[words[1]] == words[-2] for words in places)


def test_every_word_of_every_task_is_one_token_of_the_tiny_tokenizer() -> None:
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)
    assert len(tokenizer) <= TOKENIZER_VOCAB_SIZE
    for word in WORDS:
        assert len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) == 1
