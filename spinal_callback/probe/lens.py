"""Logit-lens statistics of the late blocks, folded over tiles of the vocabulary.

For ``L`` blocks and ``n`` tokens the probe needs, token by token, the Bhattacharyya coefficient
of every pair of blocks' lens distributions (adjacent pairs give the transport, the first and
last the end-to-end transport), each block's lens entropy and the deepest block's next-token
NLL. None of them needs a normalised distribution: with a running maximum ``m`` per
(token, block), as in an online softmax, each is a running sum over vocabulary columns, and the
lens logits can be made and folded a tile of columns at a time (``LensMoments``). Nothing of size
``L * n * V`` then exists, and on a CPU each tile's elementwise passes run in cache; they cost as
much as the unembedding itself when they run over memory.

A head that has to be called as a module (sharded, partitioned, or not a plain ``nn.Linear``)
gives all columns of a block of tokens at once, folded the same way. The Jensen-Shannon measure
is not a sum over columns of a pair's square roots, so it takes whole distributions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from spinal_callback.probe.capture import lens_cast
from spinal_callback.probe.metrics import per_token_transport, token_entropy, transport_from_gram
from spinal_callback.probe.model_access import ModelParts

__all__ = ["CPU_TILE_MIB", "LensMoments", "LensStatistics", "lens_statistics"]

CPU_TILE_MIB = 2
"""Upper bound, in MiB, on a float32 tile of logits on a CPU: small enough to stay in cache
through its elementwise passes (1-2 MiB measured fastest on a 135M model)."""

MIN_TILE_COLUMNS = 128
"""The narrowest tile of vocabulary columns (a narrower matrix product runs below speed)."""

SEQUENTIAL_BLOCK = 128
"""The most tokens per block: the step in which a tolerance looks for its sample size."""

MIN_SEQUENTIAL_TOKENS = 256
"""The fewest tokens a tolerance may settle on: enough for the spread to be estimated."""

_FLOAT_MIN = torch.finfo(torch.float32).min


@dataclass
class LensMoments:
    """Running sums over vocabulary tiles of ``n`` tokens' lens logits at ``L`` blocks.

    With ``m`` the running maximum of each (token, block)'s logits ``z`` and ``e_v =
    exp(z_v - m)``, all float32 on the logits' device:

    Attributes:
        maximum: ``[n, L]`` ``m`` (``finfo.min`` before the first tile).
        gram: ``[n, L, L]`` ``sum_v sqrt(e_a,v * e_b,v)``; its diagonal is the partition sum
            ``s = sum_v e_v`` of each block.
        weighted: ``[n, L]`` ``sum_v e_v * (z_v - m)``.
        target_logit: ``[n]`` the deepest block's logit of each token's target (0 until the
            tile holding it, and for a target of -1).
    """

    maximum: Tensor
    gram: Tensor
    weighted: Tensor
    target_logit: Tensor

    @classmethod
    def empty(cls, tokens: int, layers: int, device: torch.device) -> LensMoments:
        """Moments of no columns yet."""
        return cls(
            maximum=torch.full((tokens, layers), _FLOAT_MIN, device=device),
            gram=torch.zeros(tokens, layers, layers, device=device),
            weighted=torch.zeros(tokens, layers, device=device),
            target_logit=torch.zeros(tokens, device=device),
        )

    def add(self, logits: Tensor, first_column: int = 0, targets: Tensor | None = None) -> None:
        """Fold in one tile.

        Args:
            logits: ``[n, L, C]`` float32 logits of vocabulary columns ``first_column`` to
                ``first_column + C - 1``; ``-inf`` marks a column with no mass. It is
                overwritten.
            first_column: the tile's first vocabulary index.
            targets: int64 ``[n]`` vocabulary index of each token's target (-1: none).
        """
        if targets is not None:
            self._pick_targets(logits, first_column, targets)
        maximum = torch.maximum(self.maximum, logits.amax(dim=-1))
        shift = self.maximum - maximum  # <= 0: how far the running maximum rose
        rescale = torch.exp(shift)
        # (z - m) / 2 in place, finite (a no-mass column's root is 0 either way); its exp is the
        # square root of e, whose Gram holds both the pair sums and the partition sums.
        half = logits.sub_(maximum.unsqueeze(-1)).mul_(0.5).clamp_(min=_FLOAT_MIN)
        root = torch.exp(half)
        mass = self.gram.diagonal(dim1=-2, dim2=-1)
        tile_gram = root @ root.transpose(-1, -2)
        tile_weighted = 2.0 * torch.linalg.vecdot(root.square_(), half)
        self.weighted = rescale * (self.weighted + shift * mass) + tile_weighted
        root_rescale = torch.exp(0.5 * shift)
        self.gram = self.gram * (root_rescale.unsqueeze(-1) * root_rescale.unsqueeze(-2))
        self.gram += tile_gram
        self.maximum = maximum

    def _pick_targets(self, logits: Tensor, first_column: int, targets: Tensor) -> None:
        local = targets - first_column
        inside = (local >= 0) & (local < logits.shape[-1])
        index = local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
        picked = logits[:, -1].gather(-1, index).squeeze(-1)
        self.target_logit = torch.where(inside, picked, self.target_logit)

    @property
    def mass(self) -> Tensor:
        """``[n, L]`` partition sums ``s`` (at least 1 once a finite logit was seen)."""
        return self.gram.diagonal(dim1=-2, dim2=-1)

    def bhattacharyya(self) -> Tensor:
        """``[n, L, L]`` ``sum_v sqrt(p_a,v * p_b,v)`` of the normalised distributions; the
        diagonal is 1 up to rounding."""
        norm = self.mass.sqrt()
        return self.gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))

    def entropy(self) -> Tensor:
        """``[n, L]`` lens entropy in nats: ``log s - sum_v e_v (z_v - m) / s``."""
        mass = self.mass
        return torch.log(mass) - self.weighted / mass

    def target_nll(self) -> Tensor:
        """``[n]`` the deepest block's ``-log p(target)`` (meaningless where the target is -1)."""
        log_partition = self.maximum[:, -1] + torch.log(self.mass[:, -1])
        return log_partition - self.target_logit


class LensStatistics(NamedTuple):
    """Token means of the lens statistics, float32 on the hidden states' device.

    Attributes:
        transport: ``[L - 1]`` adjacent-block transport.
        end_to_end: scalar, first-to-last-block transport.
        entropy: ``[L]`` lens entropy in nats.
        next_token_nll: scalar, the deepest block's NLL of the tokens with a target (0 when
            none has one).
        tokens: how many of the tokens, from the first, the means are over.
    """

    transport: Tensor
    end_to_end: Tensor
    entropy: Tensor
    next_token_nll: Tensor
    tokens: int


def lens_statistics(
    parts: ModelParts,
    hidden: Tensor,
    targets: Tensor,
    *,
    vocab_size: int,
    measure: str = "hellinger",
    lens_dtype: str = "auto",
    budget_mib: int = 64,
    tolerance: float | None = None,
    population: int | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> LensStatistics:
    """The logit lens's statistics of ``L`` blocks' outputs at ``n`` tokens.

    With a ``tolerance``, the tokens are taken in order, a block at a time, and the rest left out
    once every transport mean (adjacent pairs and end to end) is within ``tolerance`` of its
    value over the ``population`` with about 95% confidence over all pairs together: its standard
    error, with the finite-population correction, is at most ``tolerance / 3``. The tokens must
    then be in a random order (``ProbeBatch.shuffled_sample``), so that every prefix is a simple
    random sample of the population. At least ``MIN_SEQUENTIAL_TOKENS`` are taken.

    Args:
        parts: the resolved model (final norm, head, soft-cap).
        hidden: ``[L, n, d]`` block outputs, any float dtype.
        targets: int64 ``[n]`` the next token of each token, -1 where there is none.
        vocab_size: the number of logits the head returns.
        measure: ``"hellinger"``, ``"fisher_rao"`` or ``"js"``.
        lens_dtype: ``SpinalConfig.lens_dtype``, the unembedding's precision.
        budget_mib: upper bound on the float32 logits held at once; on a CPU, a tile is also
            at most ``CPU_TILE_MIB``.
        tolerance: absolute transport error allowed against the population's value; ``None``:
            every token.
        population: the number of tokens ``hidden``'s are drawn from (default ``n``).
        agree: called with each block's decision to stop, on every rank; returns the decision
            to follow. Under DeepSpeed ZeRO-3 every call of the head gathers its weight, a
            collective every rank must make equally often, so the ranks must stop together
            (``distributed.every_rank``).

    Returns:
        ``LensStatistics``: means over the tokens taken (the NLL over those with a target).
    """
    layers, tokens = hidden.shape[0], hidden.shape[1]
    cast = lens_cast(hidden, lens_dtype)
    # Cast once per probe, not per tile (a 150k x 900 head is 0.1 s a cast).
    weight = parts.head_weight_as(cast, hidden.device)
    budget = budget_mib << 20
    if measure == "js" or weight is None:
        block = max(1, budget // (4 * layers * vocab_size))
    else:
        if hidden.device.type == "cpu":
            budget = min(budget, CPU_TILE_MIB << 20)
        block = max(1, budget // (4 * layers * MIN_TILE_COLUMNS))
    # The same blocks whether or not a tolerance is looking for its sample size, so that a
    # later run over the tokens the first one settled on sums in the same order.
    block = min(block, SEQUENTIAL_BLOCK)
    sums = torch.zeros(2 * layers + 1, dtype=torch.float32, device=hidden.device)
    squares = torch.zeros(layers, dtype=torch.float32, device=hidden.device)
    taken = 0
    while taken < tokens:
        by_token = _block(hidden, taken, block)
        block_targets = targets[taken : taken + block]
        if measure == "js":
            values = _distribution_values(parts, by_token, block_targets, cast)
        else:
            moments = LensMoments.empty(by_token.shape[0], layers, hidden.device)
            if weight is None:
                moments.add(_module_logits(parts, by_token, cast).float(), 0, block_targets)
            else:
                _fold_tiles(parts, by_token, weight, block_targets, moments, budget)
            values = _moment_values(moments, block_targets, measure)
        sums += values.sum(dim=-1)
        squares += values[:layers].square().sum(dim=-1)
        taken += by_token.shape[0]
        if tolerance is not None:
            stop = _within(sums, squares, taken, population or tokens, tolerance)
            if agree(stop) if agree is not None else stop:
                break
    predicted = (targets[:taken] >= 0).sum().clamp_min(1)
    means = sums[:-1] / taken
    return LensStatistics(
        transport=means[: layers - 1],
        end_to_end=means[layers - 1],
        entropy=means[layers:],
        next_token_nll=sums[-1] / predicted,
        tokens=taken,
    )


def _block(hidden: Tensor, start: int, size: int) -> Tensor:
    """Tokens ``start:start + size`` of ``[L, n, d]`` as ``[b, L, d]``, contiguous, so that the
    head's product is one matrix product, not a batched one."""
    return hidden[:, start : start + size].transpose(0, 1).contiguous()


def _within(sums: Tensor, squares: Tensor, taken: int, population: int, tolerance: float) -> bool:
    """Whether ``taken`` tokens' transport means (the first ``L`` of ``sums``/``squares``) are
    within ``tolerance`` of the population's (standard error at most a third of it). One host
    synchronisation."""
    if taken < min(MIN_SEQUENTIAL_TOKENS, population):
        return False
    if taken >= population:
        return True
    mean = sums[: squares.numel()] / taken
    variance = ((squares - taken * mean.square()) / (taken - 1)).clamp_min(0.0)
    standard_error = torch.sqrt(variance / taken * (1.0 - taken / population))
    return bool(standard_error.max() <= tolerance / 3.0)


def _fold_tiles(
    parts: ModelParts,
    by_token: Tensor,
    weight: Tensor,
    targets: Tensor,
    moments: LensMoments,
    budget: int,
) -> None:
    """Fold ``[b, L, d]`` block outputs' logits into ``moments``, ``budget`` bytes of columns at a
    time."""
    tokens, layers = by_token.shape[0], by_token.shape[1]
    # OPT's project_out changes the width, hence -1.
    projected = parts.lens_inputs(by_token).to(weight.dtype).reshape(tokens * layers, -1)
    columns = max(MIN_TILE_COLUMNS, budget // (4 * tokens * layers))
    for first in range(0, weight.shape[0], columns):
        logits = parts.head_logits(projected, weight, slice(first, first + columns))
        moments.add(logits.float().view(tokens, layers, -1), first, targets)


def _module_logits(parts: ModelParts, by_token: Tensor, cast: torch.dtype | None) -> Tensor:
    """All logits of ``[b, L, d]`` block outputs from the head called as a module (under
    autocast to ``cast`` when set)."""
    if cast is None:
        return parts.lens_logits(by_token)
    with torch.autocast(device_type=by_token.device.type, dtype=cast):
        return parts.lens_logits(by_token)


def _moment_values(moments: LensMoments, targets: Tensor, measure: str) -> Tensor:
    """Per token ``[2L + 1, b]``: adjacent transport, end-to-end transport, entropy, NLL (0 for
    a token without a target)."""
    adjacent, end_to_end = transport_from_gram(moments.bhattacharyya(), measure)
    nll = moments.target_nll()
    nll = torch.where(targets >= 0, nll, torch.zeros_like(nll))
    return torch.cat([adjacent, end_to_end[None], moments.entropy().T, nll[None]])


def _distribution_values(
    parts: ModelParts, by_token: Tensor, targets: Tensor, cast: torch.dtype | None
) -> Tensor:
    """``_moment_values`` from whole distributions (the Jensen-Shannon measure)."""
    log_p = torch.log_softmax(_module_logits(parts, by_token, cast), dim=-1, dtype=torch.float32)
    log_p = log_p.transpose(0, 1)  # [L, b, V]
    picked = log_p[-1].gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    nll = -torch.where(targets >= 0, picked, torch.zeros_like(picked))
    return torch.cat(
        [
            per_token_transport(log_p[:-1], log_p[1:], "js"),
            per_token_transport(log_p[0], log_p[-1], "js")[None],
            token_entropy(log_p),
            nll[None],
        ]
    )
