"""Preference pairs: reading them from JSONL, tokenizing them, and scoring replies.

A pair is ``{"prompt", "chosen", "rejected"}``. DPO and the localization audit both need the
summed log-probability of each reply given its prompt, from right-padded token batches with a
mask of the reply tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SIDES = ("chosen", "rejected")
KEYS = ("ids", "attention", "response")
PAIR_FIELDS = ("prompt", *SIDES)


def load_pairs(path: str | Path) -> list[dict[str, str]]:
    """Read preference pairs from a JSONL file, one ``{"prompt", "chosen", "rejected"}`` object
    per line (other fields are ignored, blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON, lacks a field, has a non-string or empty reply, or
            a file with no pair; the message names the line.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no pairs file at {source}; pass a JSONL file of pairs")
    pairs = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}:{number} is not JSON ({error.msg})") from None
        pairs.append(_checked_pair(row, f"{source}:{number}"))
    if not pairs:
        raise ValueError(f"{source} holds no preference pair")
    return pairs


def _checked_pair(row: Any, where: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be a JSON object with fields {list(PAIR_FIELDS)}")
    missing = [name for name in PAIR_FIELDS if name not in row]
    if missing:
        raise ValueError(f"{where} lacks {missing}; each line needs {list(PAIR_FIELDS)}")
    for name in PAIR_FIELDS:
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: {name!r} must be a string, got {type(row[name]).__name__}")
    for side in SIDES:
        if not row[side]:
            raise ValueError(f"{where}: the {side!r} reply is empty")
    return {name: row[name] for name in PAIR_FIELDS}


def collate_pairs(tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, Tensor]:
    """Tokenize prompt+chosen and prompt+rejected, right-padded, with response-token masks.

    Returns int64 ``[b, t]`` tensors ``{chosen,rejected}_{ids,attention,response}``, both sides
    padded to one length ``t``; the response mask marks the reply tokens whose log-probs DPO sums.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences: dict[str, list[list[int]]] = {side: [] for side in SIDES}
    prompt_lengths: list[int] = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        prompt_lengths.append(len(prompt))
        for side in SIDES:
            sequences[side].append(
                prompt + tokenizer(row[side], add_special_tokens=False)["input_ids"]
            )
    length = max(len(s) for side in SIDES for s in sequences[side])
    batch: dict[str, Tensor] = {}
    for side in SIDES:
        ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
        attention = torch.zeros((len(rows), length), dtype=torch.int64)
        response = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, (sequence, start) in enumerate(zip(sequences[side], prompt_lengths)):
            ids[i, : len(sequence)] = torch.tensor(sequence)
            attention[i, : len(sequence)] = 1
            response[i, start : len(sequence)] = 1
        batch.update(zip([f"{side}_{key}" for key in KEYS], (ids, attention, response)))
    return batch


def response_logps(model: nn.Module, ids: Tensor, attention: Tensor, response: Tensor) -> Tensor:
    """Summed log-probability (float32 ``[b]``, nats, <= 0) of the response tokens given
    everything before them; ``ids``, ``attention``, ``response`` are ``[b, t]``."""
    logits = model(input_ids=ids, attention_mask=attention).logits
    return reply_logps(logits, ids, response)


def reply_logps(logits: Tensor, ids: Tensor, response: Tensor) -> Tensor:
    """Summed log-probability (float32 ``[b]``, nats, <= 0) of the reply tokens from a
    forward's logits ``[b, t, V]`` (any float dtype): position ``i`` predicts token ``i + 1``
    of ``ids`` ``[b, t]``, counted where the mask ``response`` ``[b, t]`` is 1."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logps.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * response[:, 1:]).sum(dim=-1)


def reply_logp_shifts(
    model: nn.Module, reference: nn.Module, batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Per pair, ``model``'s summed reply log-prob minus ``reference``'s (float32 ``[b]``, nats),
    for the chosen and the rejected reply of a ``collate_pairs`` batch. The reference runs under
    ``torch.no_grad``; gradients flow through ``model``'s half."""
    shifts = []
    for side in SIDES:
        args = (batch[f"{side}_ids"], batch[f"{side}_attention"], batch[f"{side}_response"])
        with torch.no_grad():
            anchor = response_logps(reference, *args)
        shifts.append(response_logps(model, *args) - anchor)
    return shifts[0], shifts[1]
