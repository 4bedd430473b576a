"""Scores against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from spinal_callback.probe.metrics import (
    ContractionStatus,
    contraction_score,
    contraction_scores,
    ols_slope,
    per_token_transport,
    ramp_summaries,
    tail_band,
    transport_score,
)

MEASURES = ("hellinger", "fisher_rao", "js")


def power_law_samples(n: int, d: int, alpha: float, seed: int) -> torch.Tensor:
    """n samples whose covariance has eigenvalues k^-alpha, in a random basis."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha / 2)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (torch.randn(n, d, generator=generator, dtype=torch.float64) * scales) @ basis.T


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contraction_recovers_power_law_exponent_within_5_percent(
    d: int, alpha: float, seed: int
) -> None:
    samples = power_law_samples(16 * d, d, alpha, seed)
    assert contraction_score(samples).item() == pytest.approx(alpha, rel=0.05)


def test_contraction_is_higher_for_faster_decaying_spectra() -> None:
    slow, fast = power_law_samples(1024, 64, 1.0, 0), power_law_samples(1024, 64, 2.0, 0)
    assert contraction_score(fast) > contraction_score(slow) + 0.5


def test_contraction_uses_the_smaller_gram_matrix_consistently() -> None:
    wide = power_law_samples(48, 96, 1.5, 3)
    via_token_gram = contraction_score(wide)
    via_feature_gram = contraction_score(torch.cat([wide, wide.mean(0, keepdim=True)]))
    assert torch.isfinite(via_token_gram) and torch.isfinite(via_feature_gram)
    assert via_token_gram.item() == pytest.approx(via_feature_gram.item(), rel=0.02)


def test_contraction_is_invariant_to_masked_tokens() -> None:
    samples = power_law_samples(512, 32, 1.5, 4).float()
    junk = torch.randn(100, 32) * 1e3
    hidden = torch.cat([samples, junk]).reshape(2, 306, 32)
    mask = torch.cat([torch.ones(512), torch.zeros(100)]).reshape(2, 306)
    assert contraction_score(hidden, mask).item() == pytest.approx(
        contraction_score(samples).item(), abs=1e-6
    )


def test_contraction_accumulates_half_precision_inputs_in_float() -> None:
    samples = power_law_samples(1024, 64, 1.5, 5)
    reference = contraction_score(samples)
    for dtype in (torch.bfloat16, torch.float16):
        score = contraction_score(samples.to(dtype))
        assert score.dtype == torch.float32
        assert score.item() == pytest.approx(reference.item(), rel=0.02)
    assert contraction_score(samples.float()).item() == pytest.approx(reference.item(), rel=1e-5)


def test_contraction_of_constant_activations_is_zero_and_flagged() -> None:
    alpha, status = contraction_scores(torch.full((1, 64, 16), 3.0))
    assert alpha.item() == 0.0
    assert status.item() == ContractionStatus.DEGENERATE


def test_contraction_of_rank_deficient_activations_is_finite_and_flagged() -> None:
    low_rank = torch.randn(256, 12, dtype=torch.float64) @ torch.randn(12, 64, dtype=torch.float64)
    alpha, status = contraction_scores(low_rank.unsqueeze(0))
    assert torch.isfinite(alpha).all()
    assert status.item() == ContractionStatus.RANK_DEFICIENT


def test_contraction_of_rank_one_activations_is_zero_and_flagged() -> None:
    rank_one = torch.randn(256, 1) * torch.randn(1, 64)
    alpha, status = contraction_scores(rank_one.unsqueeze(0))
    assert alpha.item() == 0.0
    assert status.item() == ContractionStatus.DEGENERATE


def test_contraction_of_full_rank_activations_is_flagged_ok() -> None:
    _, status = contraction_scores(power_law_samples(512, 32, 1.0, 6).unsqueeze(0))
    assert status.item() == ContractionStatus.OK


def test_contraction_scores_batch_layers_like_single_calls() -> None:
    layers = torch.stack([power_law_samples(256, 32, a, 7) for a in (1.0, 1.5, 2.0)])
    batched, _ = contraction_scores(layers)
    singles = torch.stack([contraction_score(layer) for layer in layers])
    torch.testing.assert_close(batched, singles)


def test_tail_band_defaults_skip_head_and_numerical_floor() -> None:
    band = tail_band(100)
    assert (band.start, band.stop - 1) == (5, 70)


def uniform_logits(support: list[int], vocab: int) -> torch.Tensor:
    logits = torch.full((vocab,), -math.inf)
    logits[support] = 0.0
    return logits


@pytest.mark.parametrize("measure", MEASURES)
def test_transport_is_zero_for_identical_distributions(measure: str) -> None:
    logits = torch.randn(4, 7, 50)
    assert transport_score(logits, logits.clone(), measure=measure).item() == 0.0


@pytest.mark.parametrize("measure", MEASURES)
def test_transport_is_one_for_disjoint_supports(measure: str) -> None:
    a, b = uniform_logits([0, 1, 2], 8), uniform_logits([4, 5], 8)
    assert transport_score(a[None], b[None], measure=measure).item() == pytest.approx(1.0, abs=1e-6)


def two_point(p: float) -> torch.Tensor:
    return torch.log(torch.tensor([p, 1 - p], dtype=torch.float64)).float()


@pytest.mark.parametrize(("p", "q"), [(0.5, 0.5), (0.9, 0.1), (0.3, 0.6), (0.99, 0.01)])
def test_transport_matches_two_point_closed_forms(p: float, q: float) -> None:
    bc = math.sqrt(p * q) + math.sqrt((1 - p) * (1 - q))
    m = ((p + q) / 2, 1 - (p + q) / 2)
    kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y) if a > 0)  # noqa: E731
    expected = {
        "hellinger": math.sqrt(max(0.0, 1 - bc)),
        "fisher_rao": 2 / math.pi * math.acos(min(1.0, bc)),
        "js": 0.5 * (kl((p, 1 - p), m) + kl((q, 1 - q), m)) / math.log(2),
    }
    for measure, value in expected.items():
        score = transport_score(two_point(p)[None], two_point(q)[None], measure=measure)
        assert score.item() == pytest.approx(value, abs=2e-6), measure


def test_hellinger_keeps_precision_for_nearby_distributions() -> None:
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.5 + 1e-4, 0.5 - 1e-4], dtype=torch.float64)
    exact = math.sqrt(0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum().item())
    score = transport_score(p.log().float()[None], q.log().float()[None])
    assert score.item() == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize("measure", MEASURES)
def test_transport_is_invariant_to_masked_tokens(measure: str) -> None:
    a, b = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    mask[2, 0] = 0
    wild_a, wild_b = a.clone(), b.clone()
    wild_a[mask == 0] = torch.randn_like(wild_a[mask == 0]) * 100
    expected = transport_score(a[mask.bool()], b[mask.bool()], measure=measure)
    assert transport_score(wild_a, wild_b, mask, measure=measure).item() == pytest.approx(
        expected.item(), abs=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("measure", MEASURES)
def test_transport_accumulates_half_precision_logits_in_float32(
    dtype: torch.dtype, measure: str
) -> None:
    a, b = (torch.randn(64, 300) * 3).to(dtype), (torch.randn(64, 300) * 3).to(dtype)
    score = transport_score(a, b, measure=measure)
    assert score.dtype == torch.float32
    assert score.item() == pytest.approx(
        transport_score(a.float(), b.float(), measure=measure).item(), abs=1e-6
    )


def test_transport_does_not_depend_on_chunk_size() -> None:
    a, b = torch.randn(37, 90), torch.randn(37, 90)
    assert transport_score(a, b, chunk_rows=5).item() == pytest.approx(
        transport_score(a, b).item(), abs=1e-6
    )


@pytest.mark.parametrize("measure", MEASURES)
def test_transport_is_bounded_and_finite_for_extreme_logits(measure: str) -> None:
    a = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[-1e4, 1e4, 0.0], [50.0, -50.0, 0.0]])
    per_token = per_token_transport(torch.log_softmax(a, -1), torch.log_softmax(b, -1), measure)
    assert torch.isfinite(per_token).all() and (per_token >= 0).all() and (per_token <= 1).all()


def test_transport_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        transport_score(torch.randn(2, 5), torch.randn(2, 6))


def test_ramp_summaries_of_a_straight_rising_ramp() -> None:
    depth = torch.linspace(0.5, 1.0, 5)
    contraction = 1.0 + 2.0 * depth
    transport = torch.full((4,), 0.1)
    summaries = ramp_summaries(contraction, transport, torch.tensor(0.4), torch.tensor(2.5), depth)
    assert summaries["contraction_slope"].item() == pytest.approx(2.0, rel=1e-5)
    assert summaries["transport_mean"].item() == pytest.approx(0.1)
    assert summaries["transport_slope"].item() == pytest.approx(0.0, abs=1e-6)
    assert summaries["jaggedness"].item() == pytest.approx(0.0, abs=1e-6)
    assert summaries["tortuosity"].item() == pytest.approx(1.0)
    assert summaries["lens_entropy"].item() == 2.5


def test_jaggedness_is_mean_absolute_second_difference() -> None:
    contraction = torch.tensor([1.0, 2.0, 1.0, 2.0])
    summaries = ramp_summaries(
        contraction,
        torch.full((3,), 0.1),
        torch.tensor(0.1),
        torch.tensor(0.0),
        torch.linspace(0, 1, 4),
    )
    assert summaries["jaggedness"].item() == pytest.approx(2.0)


def test_tortuosity_is_finite_when_the_path_returns_to_its_start() -> None:
    summaries = ramp_summaries(
        torch.ones(4),
        torch.full((3,), 0.2),
        torch.tensor(0.0),
        torch.tensor(1.0),
        torch.linspace(0, 1, 4),
    )
    assert math.isfinite(summaries["tortuosity"].item())


def test_ols_slope_is_zero_for_constant_x() -> None:
    assert ols_slope(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])).item() == 0.0


def test_contraction_of_non_finite_activations_is_nan_without_raising() -> None:
    layers = torch.stack([power_law_samples(256, 32, 1.5, 8), power_law_samples(256, 32, 1.5, 9)])
    layers[1, 3, 4] = float("inf")
    alpha, _ = contraction_scores(layers)
    assert torch.isfinite(alpha[0]) and torch.isnan(alpha[1])
