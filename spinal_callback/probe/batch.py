"""ProbeBatch: a fixed set of token ids, the same at every probe so traces are comparable."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from spinal_callback.config import MIN_PROBE_LENGTH, MIN_SPECTRUM_TOKENS, SpinalConfig
from spinal_callback.probe.texts import check_texts

# ``from_dataset`` reads at most this many rows per probe text while it looks for distinct ones.
ROWS_SCANNED_PER_TEXT = 8


@dataclass(frozen=True)
class ProbeBatch:
    """A frozen batch of token ids: the same probe at every step makes traces comparable.

    Attributes:
        input_ids: int64 ``[b, t]`` token ids (padding positions hold the pad id).
        attention_mask: int64 ``[b, t]``, 1 for real tokens and 0 for padding. Every statistic
            uses real tokens only, so left and right padding give the same scores.
    """

    input_ids: Tensor
    attention_mask: Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"ProbeBatch needs input_ids and attention_mask of one [batch, length] shape, got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        if self.input_ids.shape[0] == 0:
            raise ValueError("ProbeBatch is empty: give at least one probe text")
        empty_rows = (self.attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(
                f"probe row(s) {empty_rows} contain no token: remove empty texts from the probe"
            )
        if self.num_valid_tokens < MIN_SPECTRUM_TOKENS:
            raise ValueError(
                f"the probe has {self.num_valid_tokens} valid tokens; the contraction spectrum "
                f"needs at least {MIN_SPECTRUM_TOKENS}: add probe texts or use longer ones"
            )

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        texts: Sequence[str],
        max_length: int = 256,
        padding_side: str = "right",
    ) -> ProbeBatch:
        """Tokenize ``texts`` (special tokens included) and pad them into one batch.

        The tokenizer is only called, never modified; padding is done here with its pad id
        (or its eos id, or 0), on ``padding_side``, so a tokenizer without a pad token works.

        Raises:
            TypeError: ``texts`` is a single string or holds a non-string (see ``check_texts``).
            ValueError: no texts, a blank text, all texts the same, a text with no tokens,
                ``max_length < 1``, or distinct texts that are all the same row once truncated
                to ``max_length`` tokens.
        """
        texts = check_texts(texts, "texts")
        _check_max_length(max_length)
        encoded = tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=max_length
        )
        token_ids = [list(ids) for ids in encoded["input_ids"]]
        # A text of only whitespace may still get a BOS token: count content tokens as well.
        content = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        empty = [i for i, ids in enumerate(content) if len(ids) == 0]
        if empty:
            raise ValueError(
                f"probe texts at positions {empty[:5]} tokenize to nothing: "
                f"{[texts[i] for i in empty[:3]]!r}; remove them"
            )
        if len(token_ids) > 1:
            _check_rows_differ(tokenizer, token_ids, max_length)
        return cls.from_token_ids(token_ids, _pad_id(tokenizer), padding_side)

    @classmethod
    def from_dataset(
        cls,
        tokenizer: Any,
        dataset: Any,
        column: str = "prompt",
        limit: int = 32,
        max_length: int = 256,
        padding_side: str = "right",
    ) -> ProbeBatch:
        """Take the first ``limit`` distinct prompts of ``dataset`` as probe texts.

        ``dataset`` is a ``datasets.Dataset`` or any sequence of dict rows (a list of dicts):
        row ``i`` is ``dataset[i]`` and its prompt is ``dataset[i][column]``. Prompts may be
        strings or chat messages (lists of ``{"role", "content"}`` dicts), which are rendered
        with the tokenizer's chat template when it has one. A dataset already tokenized by TRL
        (a ``<column>_ids`` column and no ``<column>``) is used as token ids.

        Preference data often repeats a prompt over consecutive rows, and repeated probe texts
        make the activation spectra rank-deficient, so repeats are skipped; at most
        ``ROWS_SCANNED_PER_TEXT * limit`` rows are read.

        Raises:
            ValueError: an empty dataset, a row that is not a dict, or a row without ``column``
                (the message lists the columns or keys there are); ``max_length < 1``; or
                distinct prompts that are all the same row once truncated to ``max_length``.
        """
        _check_max_length(max_length)
        names = _column_names(dataset, column)
        if names and column not in names and f"{column}_ids" not in names:
            raise ValueError(
                f"the dataset has no column {column!r}; its columns are {list(names)}. "
                "Pass column= naming the prompt column, or give probe_texts=[...] directly"
            )
        if len(dataset) == 0:
            raise ValueError(
                "the dataset has no rows to take probe prompts from: pass probe_texts=[...]"
            )
        rows = range(min(len(dataset), ROWS_SCANNED_PER_TEXT * limit))
        if column not in names:
            prompts_ids = [tuple(_prompt(dataset, i, f"{column}_ids")) for i in rows]
            ids = (row[:max_length] for row in prompts_ids)
            token_ids = [list(row) for row in _first_distinct(ids, limit)]
            if len(set(prompts_ids)) > 1:  # distinct prompts the truncation may have merged
                _check_rows_differ(tokenizer, token_ids, max_length)
            return cls.from_token_ids(token_ids, _pad_id(tokenizer), padding_side)
        prompts = (_render_prompt(tokenizer, _prompt(dataset, i, column)) for i in rows)
        texts = _first_distinct(prompts, limit)
        return cls.from_texts(tokenizer, texts, max_length=max_length, padding_side=padding_side)

    @classmethod
    def from_token_ids(
        cls, token_ids: Sequence[Sequence[int]], pad_token_id: int = 0, padding_side: str = "right"
    ) -> ProbeBatch:
        """Pad lists of token ids into a batch; ``padding_side`` is ``"right"`` or ``"left"``."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if len(token_ids) == 0:
            raise ValueError("ProbeBatch is empty: give at least one probe text")
        length = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), length), pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.int64)
        for row, ids in enumerate(token_ids):
            span = (
                slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            )
            input_ids[row, span] = torch.tensor(list(ids), dtype=torch.int64)
            attention_mask[row, span] = 1
        return cls(input_ids, attention_mask)

    @classmethod
    def stack(cls, batches: Sequence[ProbeBatch], pad_token_id: int = 0) -> ProbeBatch:
        """The rows of ``batches`` in order, right-padded with ``pad_token_id`` to the longest.

        Real tokens keep their column, so ``flat_index_in`` maps each batch's token indices into
        the stack.
        """
        length = max(int(batch.input_ids.shape[1]) for batch in batches)
        ids, masks = [], []
        for batch in batches:
            extra = length - int(batch.input_ids.shape[1])
            ids.append(torch.nn.functional.pad(batch.input_ids, (0, extra), value=pad_token_id))
            masks.append(torch.nn.functional.pad(batch.attention_mask, (0, extra), value=0))
        return cls(torch.cat(ids), torch.cat(masks))

    def flat_index_in(self, index: Tensor, length: int, row_offset: int) -> Tensor:
        """int64 flat indices into this batch's ``[b, t]`` as flat indices into a stack of row
        length ``length`` whose first row of this batch is row ``row_offset``."""
        width = int(self.input_ids.shape[1])
        return (index // width + row_offset) * length + index % width

    def next_tokens(self, index: Tensor) -> Tensor:
        """int64 ``[n]``: the id of the real token after each indexed token (flat indices into
        ``[b, t]``), or -1 where the indexed token is the last of its row."""
        width = int(self.input_ids.shape[1])
        column = index % width
        following = torch.where(column + 1 < width, index + 1, index)
        has_next = (column + 1 < width) & (self.attention_mask.reshape(-1)[following] > 0)
        return torch.where(has_next, self.input_ids.reshape(-1)[following], -1)

    @property
    def num_valid_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def position_ids(self) -> Tensor:
        """int64 ``[b, t]`` positions counted over real tokens (left padding shifts nothing)."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp_min(0)

    def valid_positions(self) -> Tensor:
        """int64 flat indices into ``[b * t]`` of the real tokens, row by row, in text order."""
        return self.attention_mask.reshape(-1).nonzero().flatten()

    def subsample(self, count: int, seed: int) -> Tensor:
        """Fixed flat indices of ``min(count, valid)`` real tokens, sorted.

        The choice depends only on the number of real tokens and ``seed``, so the same texts
        padded on either side pick the same tokens.
        """
        valid = self.valid_positions()
        if count >= valid.numel():
            return valid
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(valid.numel(), generator=generator)[:count].sort().values
        return valid[chosen]

    def shuffled_sample(self, count: int, seed: int) -> Tensor:
        """Fixed flat indices of ``min(count, valid)`` real tokens in a random order, so that
        every prefix is a simple random sample of the real tokens. Its first ``k`` are the
        tokens ``subsample(k, seed)`` picks, and padding on either side picks the same."""
        valid = self.valid_positions()
        generator = torch.Generator().manual_seed(seed)
        return valid[torch.randperm(valid.numel(), generator=generator)[:count]]


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(
            f"max_length must be a positive int (tokens kept per probe text), got "
            f"{max_length!r}; the default is 256 (SpinalConfig.max_probe_length)"
        )


def _check_rows_differ(tokenizer: Any, token_ids: Sequence[Sequence[int]], max_length: int) -> None:
    """``ValueError`` when distinct probe texts became one row of tokens once truncated:
    identical rows give identical activations, and the probe measures nothing."""
    distinct = {tuple(ids) for ids in token_ids}
    if len(distinct) == 1:
        row = next(iter(distinct))
        raise ValueError(
            "the probe texts tokenize to identical rows at "
            f"max_probe_length={max_length} (every row is {tokenizer.decode(list(row))!r}), so "
            "the probe measures nothing: raise max_probe_length (SpinalConfig.max_probe_length, "
            f"spinal audit --max-length; at least {MIN_PROBE_LENGTH}, default 256) or use texts "
            "whose first tokens differ"
        )


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _column_names(dataset: Any, column: str) -> list[str]:
    """The dataset's columns, else the keys of its first row; ``[]`` for no rows."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    return list(_row(dataset, 0, column)) if len(dataset) > 0 else []


def _row(dataset: Any, index: int, column: str) -> Mapping[str, Any]:
    row = dataset[index]
    if not isinstance(row, Mapping):
        raise ValueError(
            f"dataset row {index} is a {type(row).__name__} ({str(row)[:80]!r}), not a dict: "
            f"the probe reads each row's {column!r} field. Pass probe_texts=[...] instead"
        )
    return row


def _prompt(dataset: Any, index: int, column: str) -> Any:
    row = _row(dataset, index, column)
    if column not in row:
        raise ValueError(
            f"dataset row {index} has no {column!r} field; its keys are {sorted(row)}. "
            "Pass probe_texts=[...] instead, or column= naming the prompt field"
        )
    return row[column]


def _first_distinct(items: Iterator[Hashable], limit: int) -> list[Any]:
    """The first ``limit`` distinct items, in order of first appearance."""
    seen: dict[Hashable, None] = {}
    for item in items:
        seen.setdefault(item, None)
        if len(seen) == limit:
            break
    return list(seen)


def _render_prompt(tokenizer: Any, row: Any) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, list) and all(isinstance(m, dict) and "content" in m for m in row):
        if getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(row, tokenize=False))
        return "\n".join(str(m["content"]) for m in row)
    raise ValueError(
        f"cannot read a probe prompt from {type(row).__name__} {str(row)[:80]!r}: "
        "expected a string "
        "or a list of chat messages"
    )


def build_probe_batch(
    config: SpinalConfig,
    tokenizer: Any,
    probe_texts: Sequence[str] | None,
    dataset: Any = None,
) -> ProbeBatch:
    """The probe of a run: ``probe_texts``, else the prompts of ``dataset``, at the config's
    ``max_probe_length``.

    Raises:
        ValueError: no tokenizer, or neither texts nor a dataset with a ``prompt`` column.
    """
    if tokenizer is None:
        raise ValueError(
            "spinal-callback needs a tokenizer to build the probe: pass tokenizer=... to the "
            "callback (Lightning) or processing_class=... to the trainer (HF/TRL)"
        )
    if probe_texts is not None:
        return ProbeBatch.from_texts(tokenizer, list(probe_texts), config.max_probe_length)
    if dataset is None:
        raise ValueError(
            "spinal-callback has no probe texts and no train dataset to take prompts from: "
            "pass probe_texts=[...] to the callback"
        )
    return ProbeBatch.from_dataset(tokenizer, dataset, max_length=config.max_probe_length)
