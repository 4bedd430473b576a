"""The scores of a depth trace, as pure tensor functions (no models, no trainers).

Contraction: the power-law exponent ``alpha`` of the tail of a layer's
activation covariance spectrum, ``log lambda_k = c - alpha * log k`` fitted by least squares
over the rank band ``k in [ceil(tail_low * r), floor(tail_high * r)]``, ``r = min(n - 1, d)``.

Transport: a bounded distance between the logit-lens next-token distributions of two layers,
averaged over valid tokens. Computed from float32 log-probabilities, a block of rows at a time,
with the full vocabulary in each row so that every distribution is normalised exactly.

Every function here accepts float16/bfloat16/float32/float64 inputs and accumulates in at least
float32; none of them synchronises with the host.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import Tensor

from spinal_callback.config import MIN_SPECTRUM_TOKENS, TAIL_HIGH, TAIL_LOW

TORTUOSITY_FLOOR = 1e-6
RAMP_SUMMARY_NAMES = (
    "contraction_slope",
    "transport_mean",
    "transport_slope",
    "jaggedness",
    "tortuosity",
    "lens_entropy",
)


class ContractionStatus(IntEnum):
    """How a layer's contraction value was obtained; stored per layer in every ``DepthTrace``."""

    OK = 0
    """The whole tail band was above the numerical floor."""
    RANK_DEFICIENT = 1
    """The band was cut at the numerical rank; the fit used the eigenvalues above the floor."""
    DEGENERATE = 2
    """Fewer than two eigenvalues above the floor (e.g. constant activations): value set to 0."""


def tail_band(rank: int, tail_low: float = TAIL_LOW, tail_high: float = TAIL_HIGH) -> range:
    """1-based eigenvalue ranks fitted for a spectrum of ``rank`` eigenvalues."""
    low = max(1, math.ceil(tail_low * rank))
    high = min(rank, math.floor(tail_high * rank))
    return range(low, high + 1)


def covariance_eigenvalues(hidden: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Eigenvalues of the covariance of each layer's token activations, largest first.

    Args:
        hidden: ``[..., n, d]`` activations of ``n`` tokens (any float dtype); leading dimensions
            (e.g. layers) are batched through one eigen-decomposition call.
        dtype: float32 or float64, the precision of the Gram matrix and its eigen-decomposition.

    Returns:
        ``[..., r]`` eigenvalues in ``dtype``, ``r = min(n - 1, d)``, descending, clamped at 0.
        The smaller of the two Gram matrices (``n x n`` or ``d x d``) is decomposed.
    """
    n, d = hidden.shape[-2], hidden.shape[-1]
    if n < 2:
        raise ValueError(f"covariance_eigenvalues needs at least 2 tokens, got n={n}")
    centered = hidden.to(dtype)
    centered = centered - centered.mean(dim=-2, keepdim=True)
    transposed = centered.transpose(-1, -2)
    gram = centered @ transposed if n <= d else transposed @ centered
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1) / (n - 1)
    return eigenvalues[..., : min(n - 1, d)].clamp_min(0.0)


def fit_tail_exponent(
    eigenvalues: Tensor, tail_low: float = TAIL_LOW, tail_high: float = TAIL_HIGH
) -> tuple[Tensor, Tensor]:
    """Least-squares power-law exponent of the tail band of descending spectra.

    Eigenvalues at or below the numerical floor ``16 * r * eps(dtype) * lambda_1`` are left out of
    the fit, so rank-deficient inputs give a finite exponent over the eigenvalues that exist.

    Args:
        eigenvalues: ``[..., r]`` descending non-negative eigenvalues (float32 or float64).

    Returns:
        ``(alpha, status)``: ``alpha`` float32 ``[...]`` (higher = faster decay, 0 when
        degenerate) and ``status`` int8 ``[...]`` holding ``ContractionStatus`` codes.
    """
    rank = eigenvalues.shape[-1]
    band = tail_band(rank, tail_low, tail_high)
    if len(band) < 2:
        raise ValueError(
            f"a spectrum of {rank} eigenvalues leaves {len(band)} rank(s) in the tail band "
            f"[{band.start}, {band.stop - 1}]; the fit needs at least 2: use more tokens "
            f"(at least {MIN_SPECTRUM_TOKENS}) or widen tail_low/tail_high"
        )
    values = eigenvalues[..., band.start - 1 : band.stop - 1]
    floor = eigenvalues[..., :1] * (16 * rank * torch.finfo(eigenvalues.dtype).eps)
    usable = (values > floor) & (values > 0)
    weight = usable.to(values.dtype)
    log_rank = torch.log(
        torch.arange(band.start, band.stop, device=values.device, dtype=values.dtype)
    ).expand_as(values)
    log_value = torch.log(torch.where(usable, values, torch.ones_like(values)))
    count = weight.sum(dim=-1)
    safe_count = count.clamp_min(1.0)
    mean_x = (weight * log_rank).sum(dim=-1, keepdim=True) / safe_count.unsqueeze(-1)
    mean_y = (weight * log_value).sum(dim=-1, keepdim=True) / safe_count.unsqueeze(-1)
    dx = (log_rank - mean_x) * weight
    covariance = (dx * (log_value - mean_y)).sum(dim=-1)
    variance = (dx * dx).sum(dim=-1)
    degenerate = (count < 2) | (variance <= 0)
    alpha = torch.where(
        degenerate, torch.zeros_like(covariance), -covariance / variance.clamp_min(1e-30)
    )
    status = torch.full_like(count, ContractionStatus.OK, dtype=torch.int8)
    status = torch.where(
        count < len(band), torch.full_like(status, ContractionStatus.RANK_DEFICIENT), status
    )
    status = torch.where(degenerate, torch.full_like(status, ContractionStatus.DEGENERATE), status)
    return alpha.to(torch.float32), status


def contraction_score(
    hidden: Tensor,
    mask: Tensor | None = None,
    tail_low: float = TAIL_LOW,
    tail_high: float = TAIL_HIGH,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Contraction of one layer: the tail exponent of its activation covariance spectrum.

    Args:
        hidden: ``[n, d]`` or ``[b, t, d]`` activations, any float dtype.
        mask: ``[n]`` or ``[b, t]``; nonzero marks valid tokens (default: all valid).
        tail_low, tail_high: the fitted rank band, as fractions of ``r = min(n - 1, d)``.
        dtype: precision of the eigen-decomposition (float32 or float64).

    Returns:
        Scalar float32 tensor, dimensionless; higher means small modes vanish faster. For
        constant or rank-1 inputs it is 0 (see ``contraction_scores`` for the status code).
    """
    alpha, _ = contraction_scores(
        _valid_rows(hidden, mask).unsqueeze(0), tail_low, tail_high, dtype
    )
    return alpha[0]


def contraction_scores(
    hidden: Tensor,
    tail_low: float = TAIL_LOW,
    tail_high: float = TAIL_HIGH,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Contraction of several layers at once, in one batched eigen-decomposition.

    Args:
        hidden: ``[L, n, d]`` activations of the same ``n`` valid tokens at ``L`` layers.

    Returns:
        ``(alpha, status)``: float32 ``[L]`` and int8 ``[L]`` ``ContractionStatus`` codes. A layer
        with any non-finite activation gets ``alpha = NaN`` (the eigen-solver never sees it).
    """
    finite = torch.isfinite(hidden).flatten(-2).all(dim=-1)
    safe = torch.where(finite[..., None, None], hidden, torch.zeros_like(hidden))
    alpha, status = fit_tail_exponent(covariance_eigenvalues(safe, dtype), tail_low, tail_high)
    return torch.where(finite, alpha, torch.full_like(alpha, math.nan)), status


def per_token_transport(log_p: Tensor, log_q: Tensor, measure: str = "hellinger") -> Tensor:
    """Distance between two batches of normalised distributions given as log-probabilities.

    Args:
        log_p, log_q: ``[..., V]`` float32 log-probabilities (``-inf`` allowed for zero mass).
        measure: ``"hellinger"`` ``sqrt(1 - BC)``, ``"fisher_rao"`` ``(2/pi) arccos(BC)`` or
            ``"js"`` (Jensen-Shannon divergence in bits), with ``BC = sum_v sqrt(p_v q_v)``.

    Returns:
        ``[...]`` float32 distances in [0, 1]; 0 iff the distributions agree.
    """
    if measure == "js":
        return _jensen_shannon_bits(log_p, log_q)
    # 1 - BC = sum (sqrt p - sqrt q)^2 / 2 keeps full relative precision for nearby distributions,
    # where sqrt(1 - BC) computed from BC itself would cancel to noise.
    root_gap = torch.exp(0.5 * log_p) - torch.exp(0.5 * log_q)
    hellinger = torch.sqrt((0.5 * (root_gap * root_gap).sum(dim=-1)).clamp(0.0, 1.0))
    if measure not in ("hellinger", "fisher_rao"):
        raise ValueError(
            f"unknown transport measure {measure!r}; use 'hellinger', 'fisher_rao' or 'js'"
        )
    # fisher_rao: arccos(BC) = 2 asin(H / sqrt 2), without arccos's cancellation near BC = 1.
    return _hellinger_as(measure, hellinger)


def _jensen_shannon_bits(log_p: Tensor, log_q: Tensor) -> Tensor:
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    p, q = torch.exp(log_p), torch.exp(log_q)
    term_p = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p))
    term_q = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q))
    divergence = 0.5 * (term_p.sum(dim=-1) + term_q.sum(dim=-1)) / math.log(2.0)
    return divergence.clamp(0.0, 1.0)


def transport_from_gram(gram: Tensor, measure: str = "hellinger") -> tuple[Tensor, Tensor]:
    """Adjacent-layer and first-to-last transport from Bhattacharyya coefficients.

    ``gram``: ``[n, L, L]`` float32 ``G[t, a, b] = sum_v sqrt(p_a,v * p_b,v)`` of ``L`` layers'
    distributions at ``n`` tokens (``lens.LensMoments.bhattacharyya``); the diagonal is each
    distribution's mass, 1 up to rounding.

    ``H^2 = (G_aa + G_bb) / 2 - G_ab``, the mass-corrected ``1 - BC``. It avoids materialising
    ``sqrt p - sqrt q`` over the vocabulary, at a float32 absolute error below 1e-3 on nearby
    distributions of a 49k vocabulary (measured against float64); identical distributions give
    exactly 0.

    Returns:
        ``[L - 1, n]`` adjacent-layer and ``[n]`` first-to-last float32 distances in [0, 1]
        (``"hellinger"`` or ``"fisher_rao"``, as ``per_token_transport``).
    """
    mass = gram.diagonal(dim1=1, dim2=2)
    adjacent = 0.5 * (mass[:, :-1] + mass[:, 1:]) - gram.diagonal(offset=1, dim1=1, dim2=2)
    end_to_end = 0.5 * (mass[:, 0] + mass[:, -1]) - gram[:, 0, -1]
    return (
        _hellinger_as(measure, torch.sqrt(adjacent.clamp(0.0, 1.0)).T),
        _hellinger_as(measure, torch.sqrt(end_to_end.clamp(0.0, 1.0))),
    )


def _hellinger_as(measure: str, hellinger: Tensor) -> Tensor:
    if measure == "hellinger":
        return hellinger
    if measure == "fisher_rao":
        return (4.0 / math.pi) * torch.asin((hellinger / math.sqrt(2.0)).clamp(0.0, 1.0))
    raise ValueError(f"the Gram form supports 'hellinger' and 'fisher_rao', got {measure!r}")


def token_entropy(log_p: Tensor) -> Tensor:
    """Entropy in nats of ``[..., V]`` log-probabilities; returns ``[...]`` float32."""
    p = torch.exp(log_p)
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)


def transport_score(
    logits_a: Tensor,
    logits_b: Tensor,
    mask: Tensor | None = None,
    measure: str = "hellinger",
    chunk_rows: int = 1024,
) -> Tensor:
    """Mean distance between the next-token distributions of two layers' logits.

    Args:
        logits_a, logits_b: ``[..., V]`` unnormalised logits of the same tokens, any float
            dtype; softmax is taken in float32 over the full vocabulary.
        mask: ``[...]`` (the logits' shape without ``V``); nonzero marks valid tokens.
        measure: ``"hellinger"`` (default), ``"fisher_rao"`` or ``"js"``.
        chunk_rows: tokens processed at once, bounding temporaries at ``chunk_rows * V`` floats.

    Returns:
        Scalar float32 tensor in [0, 1]: 0 for identical distributions, 1 for disjoint supports.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"transport_score needs logits of one shape, got {tuple(logits_a.shape)} "
            f"and {tuple(logits_b.shape)}"
        )
    rows_a, rows_b = _valid_rows(logits_a, mask), _valid_rows(logits_b, mask)
    total = torch.zeros((), dtype=torch.float32, device=rows_a.device)
    for start in range(0, rows_a.shape[0], chunk_rows):
        log_p = torch.log_softmax(rows_a[start : start + chunk_rows].float(), dim=-1)
        log_q = torch.log_softmax(rows_b[start : start + chunk_rows].float(), dim=-1)
        total = total + per_token_transport(log_p, log_q, measure).sum()
    return total / rows_a.shape[0]


def ols_slope(x: Tensor, y: Tensor) -> Tensor:
    """Least-squares slope of ``y [n]`` against ``x [n]``; 0 when ``x`` is constant."""
    dx = x - x.mean()
    variance = (dx * dx).sum()
    return torch.where(variance > 0, (dx * (y - y.mean())).sum() / variance.clamp_min(1e-30), 0.0)


def ramp_summaries(
    contraction: Tensor,
    transport: Tensor,
    end_to_end_transport: Tensor,
    lens_entropy: Tensor,
    depth: Tensor,
) -> dict[str, Tensor]:
    """The late-band summaries of one probe.

    Args:
        contraction: ``[L]`` float32 contraction per late layer.
        transport: ``[L - 1]`` float32 transport between adjacent late layers.
        end_to_end_transport: scalar, transport between the first and the last late layer.
        lens_entropy: scalar, mean entropy (nats) of the last late layer's lens distribution.
        depth: ``[L]`` normalised depth ``index / (num_blocks - 1)`` of each late layer.

    Returns:
        Scalar float32 tensors keyed by ``RAMP_SUMMARY_NAMES``. ``tortuosity`` is the path length
        over the end-to-end distance (1 = straight; the denominator is floored at 1e-6).
        ``jaggedness`` is the mean absolute second difference of contraction (0 for L < 3).
    """
    midpoints = 0.5 * (depth[1:] + depth[:-1])
    if contraction.numel() >= 3:
        second_difference = contraction[2:] - 2 * contraction[1:-1] + contraction[:-2]
        jaggedness = second_difference.abs().mean()
    else:
        jaggedness = torch.zeros((), dtype=torch.float32, device=contraction.device)
    summaries = {
        "contraction_slope": ols_slope(depth, contraction),
        "transport_mean": transport.mean(),
        "transport_slope": ols_slope(midpoints, transport),
        "jaggedness": jaggedness,
        "tortuosity": transport.sum() / end_to_end_transport.clamp_min(TORTUOSITY_FLOOR),
        "lens_entropy": lens_entropy,
    }
    return {name: value.to(torch.float32) for name, value in summaries.items()}


def _valid_rows(values: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten ``[..., k]`` to ``[n, k]`` rows, keeping the rows where ``mask`` is nonzero."""
    rows = values.reshape(-1, values.shape[-1])
    if mask is None:
        return rows
    if mask.shape != values.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the values' leading shape "
            f"{tuple(values.shape[:-1])}"
        )
    selected = rows[mask.reshape(-1).to(torch.bool)]
    if selected.shape[0] == 0:
        raise ValueError("the mask selects no token; at least one valid token is needed")
    return selected
