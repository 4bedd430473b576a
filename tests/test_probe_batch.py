"""Probe texts from the user and prompts from a dataset: bad ones fail at setup, named."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from spinal_callback.probe.batch import ProbeBatch
from spinal_callback.probe.texts import check_texts

README_PROBE = ["Explain why the sky is blue.", "Write a haiku about rain."] * 8


def test_distinct_texts_pass_unchanged_and_silently(probe_texts: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_texts(tuple(probe_texts), "probe_texts") == probe_texts


def test_a_generator_of_texts_is_read_as_a_list(probe_texts: list[str]) -> None:
    assert check_texts((text for text in probe_texts), "probe_texts") == probe_texts


def test_a_single_string_is_rejected_with_a_hint_to_pass_a_list() -> None:
    with pytest.raises(TypeError, match=r"probe_texts is a single string.*probe_texts=\[text\]"):
        check_texts("one prompt", "probe_texts")


def test_an_empty_probe_list_says_none_takes_prompts_from_the_dataset() -> None:
    with pytest.raises(ValueError, match="probe_texts is empty: pass None to take prompts from"):
        check_texts([], "probe_texts")


def test_an_empty_neutral_list_says_none_uses_the_built_in_texts() -> None:
    with pytest.raises(ValueError, match="neutral_texts is empty: pass None to use the built-in"):
        check_texts([], "neutral_texts")


@pytest.mark.parametrize("element", [None, 3, {"prompt": "hi"}, b"bytes"])
def test_a_text_that_is_not_a_string_is_named_by_position(element: object) -> None:
    texts = ["The river is low.", element, "Snow fell overnight."]
    with pytest.raises(TypeError, match=r"probe_texts .*positions \[1\] are not strings"):
        check_texts(texts, "probe_texts")  # type: ignore[arg-type]


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_a_blank_text_is_named_by_position(blank: str) -> None:
    with pytest.raises(ValueError, match=r"neutral_texts at positions \[2\] tokenize to nothing"):
        check_texts(["The river is low.", "Snow fell.", blank], "neutral_texts")


def test_a_set_is_rejected_because_it_has_no_fixed_order() -> None:
    with pytest.raises(TypeError, match="probe_texts is a set, which has no fixed order"):
        check_texts({"The river is low.", "Snow fell."}, "probe_texts")


@pytest.mark.parametrize("texts", [{"prompt": "The river is low."}, 5])
def test_a_mapping_or_a_non_iterable_is_rejected(texts: Any) -> None:
    with pytest.raises(TypeError, match="probe_texts must be a list of strings"):
        check_texts(texts, "probe_texts")


def test_texts_that_are_all_the_same_are_rejected() -> None:
    with pytest.raises(ValueError, match="one text repeated 8 times.*needs distinct texts"):
        check_texts(["some prompt"] * 8, "probe_texts")


def test_repeated_texts_are_kept_with_a_warning_and_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="spinal_callback"),
        pytest.warns(UserWarning, match="14 duplicate text.*among 16 .*needs distinct texts"),
    ):
        assert check_texts(README_PROBE, "probe_texts") == README_PROBE
    assert "14 duplicate text" in caplog.text


def test_from_texts_rejects_a_single_string(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(TypeError, match="single string"):
        ProbeBatch.from_texts(tokenizer, "The river is low and the bridge is closed for repairs.")


def test_from_texts_keeps_the_readme_probe_of_repeated_prompts_and_warns(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    with pytest.warns(UserWarning, match="14 duplicate"):
        batch = ProbeBatch.from_texts(tokenizer, README_PROBE)
    assert batch.input_ids.shape[0] == 16


def test_from_dataset_reads_a_list_of_dicts(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    rows = [{"prompt": text, "chosen": "a", "rejected": "b"} for text in probe_texts]
    assert ProbeBatch.from_dataset(tokenizer, rows).input_ids.shape[0] == len(probe_texts)


def test_from_dataset_names_the_keys_of_a_row_without_a_prompt(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    rows: list[dict[str, Any]] = [{"prompt": text} for text in probe_texts[:3]]
    rows.append({"question": "Why?", "answer": "Because."})
    with pytest.raises(
        ValueError, match=r"row 3 has no 'prompt' field; its keys are \['answer', 'question'\]"
    ) as error:
        ProbeBatch.from_dataset(tokenizer, rows)
    assert "probe_texts=[...]" in str(error.value)


def test_from_dataset_names_the_keys_when_no_row_has_a_prompt(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    rows = [{"question": "Why?", "answer": "Because."}]
    with pytest.raises(ValueError, match=r"no column 'prompt'; its columns are \['question'"):
        ProbeBatch.from_dataset(tokenizer, rows)


def test_from_dataset_rejects_rows_that_are_not_dicts(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    with pytest.raises(ValueError, match=r"row 0 is a str .*not a dict.*probe_texts=\[\.\.\.\]"):
        ProbeBatch.from_dataset(tokenizer, probe_texts)


def test_from_dataset_rejects_an_empty_dataset(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"no rows to take probe prompts from"):
        ProbeBatch.from_dataset(tokenizer, [])


def test_from_dataset_skips_repeated_prompts(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    rows = [{"prompt": text} for text in probe_texts for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = ProbeBatch.from_dataset(tokenizer, rows, limit=8)
    assert (
        batch.input_ids.tolist()
        == ProbeBatch.from_texts(tokenizer, probe_texts[:8]).input_ids.tolist()
    )


def test_from_dataset_reads_the_prompt_column_of_a_hugging_face_dataset(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([{"prompt": text, "chosen": "a"} for text in probe_texts])
    batch = ProbeBatch.from_dataset(tokenizer, dataset, limit=4)
    assert (
        batch.input_ids.tolist()
        == ProbeBatch.from_texts(tokenizer, probe_texts[:4]).input_ids.tolist()
    )


def test_from_dataset_reads_token_ids_of_a_dataset_tokenized_by_trl(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    datasets = pytest.importorskip("datasets")
    ids = [tokenizer(text)["input_ids"] for text in probe_texts]
    dataset = datasets.Dataset.from_list([{"prompt_ids": row} for row in ids])
    batch = ProbeBatch.from_dataset(tokenizer, dataset)
    assert batch.attention_mask.sum(dim=1).tolist() == [len(row) for row in ids]


@pytest.mark.parametrize("side", ["left", "right"])
def test_every_prefix_of_the_shuffled_sample_is_the_subsample_of_its_size(side: str) -> None:
    batch = ProbeBatch.from_token_ids([[5] * 30, [6] * 11, [7] * 23], padding_side=side)
    shuffled = batch.shuffled_sample(40, seed=3)
    assert shuffled.numel() == 40
    for size in (1, 17, 40):
        assert torch.equal(shuffled[:size].sort().values, batch.subsample(size, seed=3))
    right = ProbeBatch.from_token_ids([[5] * 30, [6] * 11, [7] * 23])
    assert torch.equal(
        batch.input_ids.reshape(-1)[shuffled],
        right.input_ids.reshape(-1)[right.shuffled_sample(40, 3)],
    )


def test_from_texts_rejects_distinct_texts_that_truncate_to_identical_rows(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    with pytest.raises(
        ValueError,
        match=r"tokenize to identical rows at max_probe_length=1 .*raise max_probe_length",
    ):
        ProbeBatch.from_texts(tokenizer, probe_texts, max_length=1)


def test_from_dataset_rejects_token_id_prompts_that_truncate_to_one_row(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    shared = list(range(10, 30))
    rows = [{"prompt_ids": [*shared, 100 + i]} for i in range(8)]
    with pytest.raises(ValueError, match=r"identical rows at max_probe_length=16"):
        ProbeBatch.from_dataset(tokenizer, rows, max_length=16)


def test_a_single_probe_text_is_one_row_and_not_refused_as_identical(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    batch = ProbeBatch.from_texts(tokenizer, [" ".join(probe_texts)], max_length=64)
    assert batch.input_ids.shape == (1, 64)


@pytest.mark.parametrize("max_length", [0, -5])
def test_from_texts_rejects_a_max_length_below_one_naming_it(
    tokenizer: PreTrainedTokenizerFast, probe_texts: list[str], max_length: int
) -> None:
    with pytest.raises(ValueError, match=rf"max_length must be a positive int .*got {max_length}"):
        ProbeBatch.from_texts(tokenizer, probe_texts, max_length=max_length)
