"""The lens statistics folded over vocabulary tiles equal those of whole distributions."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from spinal_callback.probe import lens
from spinal_callback.probe.lens import LensMoments, LensStatistics, lens_statistics
from spinal_callback.probe.metrics import per_token_transport, token_entropy, transport_from_gram
from spinal_callback.probe.model_access import ModelParts, resolve_model_parts


def folded(logits: torch.Tensor, columns: int, targets: torch.Tensor | None = None) -> LensMoments:
    """``[n, L, V]`` logits folded ``columns`` at a time, in vocabulary order."""
    moments = LensMoments.empty(logits.shape[0], logits.shape[1], logits.device)
    for first in range(0, logits.shape[-1], columns):
        moments.add(logits[..., first : first + columns].clone(), first, targets)
    return moments


def whole(logits: torch.Tensor) -> torch.Tensor:
    """``[L, n, V]`` float64 log-probabilities of ``[n, L, V]`` logits."""
    return torch.log_softmax(logits.double(), dim=-1).transpose(0, 1)


@pytest.mark.parametrize("columns", [1, 7, 64, 200])
@pytest.mark.parametrize("measure", ["hellinger", "fisher_rao"])
def test_tiles_of_any_width_give_the_transport_of_whole_distributions(
    columns: int, measure: str
) -> None:
    logits = 4 * torch.randn(6, 5, 200)
    adjacent, end_to_end = transport_from_gram(folded(logits, columns).bhattacharyya(), measure)
    log_p = whole(logits)
    expected = per_token_transport(log_p[:-1], log_p[1:], measure)
    torch.testing.assert_close(adjacent.double(), expected, atol=2e-6, rtol=1e-4)
    expected_end = per_token_transport(log_p[0], log_p[-1], measure)
    torch.testing.assert_close(end_to_end.double(), expected_end, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("columns", [1, 9, 100])
def test_tiles_give_the_entropy_and_target_nll_of_whole_distributions(columns: int) -> None:
    logits = 3 * torch.randn(8, 4, 100)
    targets = torch.tensor([0, 5, 99, 42, 42, 17, 63, 8])
    moments = folded(logits, columns, targets)
    log_p = whole(logits)
    torch.testing.assert_close(
        moments.entropy().T.double(), token_entropy(log_p), atol=1e-5, rtol=1e-5
    )
    expected_nll = -log_p[-1].gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(moments.target_nll().double(), expected_nll, atol=1e-5, rtol=1e-5)


def test_a_rising_maximum_in_a_late_tile_rescales_the_earlier_sums() -> None:
    logits = torch.randn(3, 4, 60)
    logits[..., -1] = 40.0  # the last column dominates every distribution
    moments = folded(logits, 10)
    log_p = whole(logits)
    torch.testing.assert_close(
        moments.entropy().T.double(), token_entropy(log_p), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(moments.bhattacharyya().diagonal(dim1=-2, dim2=-1), torch.ones(3, 4))


def test_columns_without_mass_and_a_tile_without_any_add_nothing() -> None:
    logits = 2 * torch.randn(4, 3, 40)
    logits[:, :, :10] = -math.inf  # the whole first tile has no mass
    logits[1, 2, 25] = -math.inf
    moments = folded(logits, 10, torch.tensor([12, 30, 39, 11]))
    log_p = whole(logits)
    assert torch.isfinite(moments.gram).all() and torch.isfinite(moments.weighted).all()
    torch.testing.assert_close(
        moments.entropy().T.double(), token_entropy(log_p), atol=1e-5, rtol=1e-5
    )
    adjacent, _ = transport_from_gram(moments.bhattacharyya())
    torch.testing.assert_close(
        adjacent.double(), per_token_transport(log_p[:-1], log_p[1:]), atol=2e-6, rtol=1e-4
    )


def test_identical_layers_have_exactly_zero_transport() -> None:
    logits = (3 * torch.randn(5, 1, 300)).expand(5, 4, 300).contiguous()
    adjacent, end_to_end = transport_from_gram(folded(logits, 128).bhattacharyya())
    assert torch.equal(adjacent, torch.zeros(3, 5)) and torch.equal(end_to_end, torch.zeros(5))


def test_nearby_distributions_of_a_large_vocabulary_are_within_1e_3_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(16, 1, 49152, generator=generator, dtype=torch.float64)
    logits = torch.cat([logits, logits + 1e-3 * torch.randn(logits.shape, generator=generator)], 1)
    log_p = whole(logits)
    exact = per_token_transport(log_p[0], log_p[1])
    adjacent, _ = transport_from_gram(folded(logits.float(), 4096).bhattacharyya())
    assert (adjacent[0].double() - exact).abs().max().item() < 1e-3


def lens_of(
    model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor, **options: Any
) -> LensStatistics:
    """``lens_statistics`` of ``model``'s ``[L, n, d]`` block outputs, without autograd."""
    with torch.no_grad():
        return lens_statistics(
            resolve_model_parts(model),
            hidden,
            targets,
            vocab_size=model.config.vocab_size,
            **options,
        )


def full_lens_statistics(
    parts: ModelParts, hidden: torch.Tensor, targets: torch.Tensor
) -> list[torch.Tensor]:
    """Transport, end-to-end transport, entropy and NLL from whole float64 distributions."""
    log_p = torch.log_softmax(parts.lens_logits(hidden).double(), dim=-1)
    picked = log_p[-1].gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1)
    has_target = targets >= 0
    return [
        per_token_transport(log_p[:-1], log_p[1:]).mean(dim=-1),
        per_token_transport(log_p[0], log_p[-1]).mean(),
        token_entropy(log_p).mean(dim=-1),
        -(picked * has_target).sum() / has_target.sum(),
    ]


@pytest.mark.parametrize("head", ["tiled weight", "module"])
def test_lens_statistics_equal_those_of_whole_distributions(
    llama: PreTrainedModel, head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = resolve_model_parts(llama)
    if head == "module":
        monkeypatch.setattr(ModelParts, "head_weight_as", lambda *args: None)
    monkeypatch.setattr(lens, "CPU_TILE_MIB", 0)  # the narrowest tiles: many per vocabulary
    hidden = torch.randn(4, 30, llama.config.hidden_size)
    targets = torch.randint(0, llama.config.vocab_size, (30,))
    targets[-3:] = -1
    ours = lens_of(llama, hidden, targets, lens_dtype="native")
    with torch.no_grad():
        expected = full_lens_statistics(parts, hidden, targets)
    for value, reference in zip(ours, expected):
        torch.testing.assert_close(value.double(), reference, atol=1e-5, rtol=1e-5)


def test_the_jensen_shannon_measure_takes_whole_distributions(llama: PreTrainedModel) -> None:
    parts = resolve_model_parts(llama)
    hidden = torch.randn(3, 12, llama.config.hidden_size)
    targets = torch.zeros(12, dtype=torch.long)
    ours = lens_of(llama, hidden, targets, measure="js", lens_dtype="native")
    with torch.no_grad():
        log_p = torch.log_softmax(parts.lens_logits(hidden).double(), dim=-1)
    expected = per_token_transport(log_p[:-1], log_p[1:], "js").mean(dim=-1)
    torch.testing.assert_close(ours.transport.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_tolerance_stops_at_the_fewest_tokens_when_the_transport_barely_varies(
    llama: PreTrainedModel,
) -> None:
    hidden = torch.randn(4, 600, llama.config.hidden_size)
    targets = torch.zeros(600, dtype=torch.long)
    loose = lens_of(llama, hidden, targets, tolerance=1.0)
    strict = lens_of(llama, hidden, targets, tolerance=1e-9)
    every = lens_of(llama, hidden, targets)
    assert loose.tokens == lens.MIN_SEQUENTIAL_TOKENS
    assert strict.tokens == every.tokens == 600
    torch.testing.assert_close(strict.transport, every.transport)


def test_a_tolerance_takes_tokens_until_the_standard_error_is_a_third_of_it(
    llama: PreTrainedModel,
) -> None:
    """Spread-out tokens: the sample size lands where the finite-population standard error of
    the noisiest transport mean first drops to ``tolerance / 3``, in steps of a block."""
    hidden = 3 * torch.randn(4, 1024, llama.config.hidden_size)
    targets = torch.zeros(1024, dtype=torch.long)
    per_token = [lens_of(llama, hidden[:, i : i + 1], targets[i : i + 1]) for i in range(1024)]
    values = torch.stack([torch.cat([s.transport, s.end_to_end[None]]) for s in per_token], 1)
    population = 4096
    tolerance = 0.01
    taken = lens_of(llama, hidden, targets, tolerance=tolerance, population=population).tokens
    for count in (taken - lens.SEQUENTIAL_BLOCK, taken):
        sample = values[:, :count]
        error = (sample.var(dim=1) / count * (1 - count / population)).sqrt().max()
        within = bool(error <= tolerance / 3)
        assert within == (count == taken) or count < lens.MIN_SEQUENTIAL_TOKENS


def test_the_ranks_agreement_decides_when_the_lens_stops(llama: PreTrainedModel) -> None:
    """Under ZeRO-3 each head call is a collective: a rank that wants to stop goes on while
    another does not (``agree``), and every block asks it."""
    hidden = torch.randn(4, 600, llama.config.hidden_size)
    targets = torch.zeros(600, dtype=torch.long)
    asked: list[bool] = []

    def another_rank_goes_on(stop: bool) -> bool:
        asked.append(stop)
        return False

    statistics = lens_of(llama, hidden, targets, tolerance=1.0, agree=another_rank_goes_on)
    assert statistics.tokens == 600
    assert len(asked) == 600 // lens.SEQUENTIAL_BLOCK + 1 and asked[1] is True
