"""Reply log-probabilities: position ``i`` of the logits predicts token ``i + 1``, and only the
reply tokens (the response mask) count. DPO (``response_logps``) and the localization audit
(``patching``) score replies with the one function, ``reply_logps``."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from spinal_callback.tools import patching
from spinal_callback.tools.pairs import reply_logps, response_logps

VOCAB = 5
IDS = torch.tensor([[3, 1, 0, 4]])
PROMPT_THEN_REPLY = torch.tensor([[0, 0, 1, 1]])
EXPECTED = pytest.approx(math.log(0.5) - math.log(VOCAB), rel=1e-6)
"""Reply tokens 0 (predicted at position 1, with p = 1/2) and 4 (at position 2: uniform)."""


def half_on_token_zero_after_position_one() -> Tensor:
    """Logits ``[1, 4, V]``: uniform, except that position 1 gives token 0 probability 1/2."""
    logits = torch.zeros(1, 4, VOCAB)
    logits[0, 1] = torch.tensor([0.5, 0.125, 0.125, 0.125, 0.125]).log()
    return logits


class FixedLogits(nn.Module):
    """A causal LM whose forward returns ``logits`` whatever the input."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        return SimpleNamespace(logits=self.logits)


def test_reply_logps_sums_the_log_probs_of_the_reply_tokens_each_given_the_tokens_before() -> None:
    logps = reply_logps(half_on_token_zero_after_position_one(), IDS, PROMPT_THEN_REPLY)
    assert logps.dtype == torch.float32 and logps.shape == (1,)
    assert logps.item() == EXPECTED


def test_reply_logps_ignores_the_prompt_tokens() -> None:
    logits = half_on_token_zero_after_position_one()
    logits[0, 0] = torch.tensor([30.0, -30.0, 30.0, 30.0, 30.0])  # prompt token 1: p ~ e^-60
    logps = reply_logps(logits, IDS, PROMPT_THEN_REPLY)
    assert logps.item() == EXPECTED


def test_reply_logps_computes_in_float32_from_half_precision_logits() -> None:
    logits = half_on_token_zero_after_position_one().to(torch.bfloat16)
    logps = reply_logps(logits, IDS, PROMPT_THEN_REPLY)
    assert logps.dtype == torch.float32
    assert logps.item() == pytest.approx(math.log(0.5) - math.log(VOCAB), abs=1e-2)


def test_response_logps_scores_the_models_logits_with_reply_logps() -> None:
    model = FixedLogits(half_on_token_zero_after_position_one())
    logps = response_logps(model, IDS, torch.ones_like(IDS), PROMPT_THEN_REPLY)
    assert logps.item() == EXPECTED


def test_patching_scores_replies_with_the_pairs_function() -> None:
    assert patching.reply_logps is reply_logps
