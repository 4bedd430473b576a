"""Localize: which layers, and how few directions in them, carry a tuned model's preferences.

After "Alignment is Localized" (arXiv 2510.16167). For preference pairs and a base/tuned pair
of models with the same architecture:

1. **Causal patching.** For each block ``l``, run the base model with the residual stream at
   block ``l``'s output replaced by the tuned model's, at the positions that score the reply
   (``all_tokens=True``: every token), and measure the preference margin
   ``m = log p(chosen | prompt) - log p(rejected | prompt)`` (summed reply-token log-probs, nats).
   ``effect[l] = mean(m_patched_l - m_base) / mean(m_tuned - m_base)``: the share of the tuned
   model's margin gain that the residual state at ``l`` carries (1 at the last block when the
   final norm and head are unchanged). The residual state at ``l`` holds everything blocks
   ``0..l`` changed, so a block's own share is ``gain[l] = effect[l] - effect[l - 1]``; layers
   are ranked by it. Confidence intervals are percentile bootstraps over pairs.
2. **Sparse attribution.** LASSO (cross-validated alpha) of each pair's margin gain
   ``m_tuned - m_base`` on its per-layer activation distances ``||h_tuned - h_base||``
   (mean over the patched positions, standardized): the layers with non-zero coefficients,
   and the fit's R^2.
3. **Low rank.** For the top layers by gain, the patch delta ``h_tuned - h_base`` projected on
   its top-``k`` principal directions (uncentered, over all patched positions):
   ``recovered[k] = mean(m_rank_k - m_base) / mean(m_patched_l - m_base)``.

Cost: patching needs ``L + 2`` forwards per batch of pairs (base and tuned once, with every
block output cached, then one patched base forward per block); the low-rank step adds
``4 + top_layers * len(ranks)`` per batch. The two models may sit on different devices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback.probe.model_access import ModelParts, hidden_size, resolve_model_parts
from spinal_callback.tools.pairs import SIDES, collate_pairs
from spinal_callback.tools.patching import PatchRunner, check_same_architecture

MIN_PAIRS = 2
"""The fewest pairs ``localize`` takes: its intervals bootstrap over pairs, and every resample
of one pair is that pair, so its "confidence interval" would have zero width."""

MIN_LOW_RANK_GAIN = 0.05
"""Blocks whose own share of the effect is below this get no low-rank analysis."""


@dataclass
class SparseAttribution:
    """LASSO of per-pair margin gain on per-layer activation distances.

    Attributes:
        alpha: the cross-validated L1 penalty.
        r2: coefficient of determination of the fit on all pairs.
        coefficients: one per block, on standardized distances (nats per standard deviation).
        selected: blocks with a non-zero coefficient, largest magnitude first.
    """

    alpha: float
    r2: float
    coefficients: list[float]
    selected: list[int]


@dataclass
class LowRankRecovery:
    """Share of one block's patch effect recovered by a rank-``k`` projection of its delta.

    Attributes:
        layer: the block.
        ranks: the ``k`` values tried, ascending.
        recovered: per rank, mean rank-``k`` margin change over the full patch's.
        energy: per rank, share of the delta's squared norm in the top-``k`` directions.
    """

    layer: int
    ranks: list[int]
    recovered: list[float]
    energy: list[float]


@dataclass
class Localization:
    """What ``localize`` measured; ``to_dict``/``save`` give JSON, ``format_table`` text.

    Per-block lists are indexed by block (``layers[i] == i``). Margins are in nats.
    """

    layers: list[int]
    pairs: int
    margin_base: float
    margin_tuned: float
    effect: list[float]
    effect_ci: list[tuple[float, float]]
    gain: list[float]
    gain_ci: list[tuple[float, float]]
    ranking: list[int]
    distance: list[float]
    sparse: SparseAttribution | None
    low_rank: list[LowRankRecovery]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON; returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=1))
        return target

    def format_table(self) -> str:
        """Per-block effect and gain with CIs, mean distance, LASSO coefficient; then low rank."""
        level = 1.0 - self.settings.get("confidence", 0.95)
        header = (
            f"{'block':>5}  {'effect':>7} {'CI':>17}  {'gain':>7} {'CI':>17}  "
            f"{'distance':>9}  {'lasso':>8}"
        )
        lines = [
            f"{self.pairs} pairs; mean margin base {self.margin_base:+.3f}, tuned "
            f"{self.margin_tuned:+.3f} nats; {100 * (1 - level):.0f}% bootstrap CIs",
            header,
        ]
        for i, layer in enumerate(self.layers):
            lasso = f"{self.sparse.coefficients[i]:+8.3f}" if self.sparse else f"{'-':>8}"
            lines.append(
                f"{layer:>5}  {self.effect[i]:+7.3f} {_interval(self.effect_ci[i])}  "
                f"{self.gain[i]:+7.3f} {_interval(self.gain_ci[i])}  "
                f"{self.distance[i]:9.4f}  {lasso}"
            )
        lines.append(f"ranking by gain: {self.ranking}")
        if self.sparse is not None:
            lines.append(
                f"LASSO (alpha {self.sparse.alpha:.3g}, R^2 {self.sparse.r2:.3f}) selects "
                f"blocks {self.sparse.selected}"
            )
        for recovery in self.low_rank:
            shares = ", ".join(
                f"k={k}: {r:.3f}" for k, r in zip(recovery.ranks, recovery.recovered)
            )
            lines.append(f"block {recovery.layer} low rank recovered: {shares}")
        return "\n".join(lines)


def _interval(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:+6.3f}, {bounds[1]:+6.3f}]"


def localize(
    base: nn.Module,
    tuned: nn.Module,
    tokenizer: Any,
    pairs: Sequence[dict[str, str]],
    *,
    batch_size: int = 8,
    all_tokens: bool = False,
    top_layers: int = 3,
    ranks: Sequence[int] | None = None,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    blocks_path: str | None = None,
) -> Localization:
    """Patch, attribute and reduce the tuned model's preference effect (module docstring).

    Args:
        base, tuned: causal LMs of one architecture (same block count and width), each on its
            own device; both are used in eval mode under ``torch.no_grad`` and left as found.
        tokenizer: the tokenizer of both models.
        pairs: ``{"prompt", "chosen", "rejected"}`` dicts (``pairs.load_pairs`` reads JSONL).
        batch_size: pairs per forward (each forward holds ``2 * batch_size`` sequences).
        all_tokens: patch every token, not only the positions that score the reply.
        top_layers: how many blocks (by gain, among those with a gain of at least
            ``MIN_LOW_RANK_GAIN``) get the low-rank analysis; 0 skips it.
        ranks: ``k`` values for the low-rank analysis (default 1, 2, 4, ... up to the width).
        bootstrap: bootstrap resamples over pairs for the confidence intervals.
        confidence: two-sided level of the intervals.
        seed: seed of the bootstrap and the LASSO's cross-validation folds.
        progress: show a progress bar (stderr) over batches and layers.
        blocks_path: attribute path of the decoder blocks where the automatic lookup fails.

    Raises:
        ValueError: mismatched models (block count, width, vocabulary, architecture, or
            parameter names and shapes: ``patching.check_same_architecture``), fewer than
            ``MIN_PAIRS`` pairs (``check_pair_count``), bad settings, or a tuned model that
            does not move the mean margin (nothing to localize).
    """
    _check_settings(pairs, batch_size, top_layers, bootstrap, confidence, ranks)
    base_parts = resolve_model_parts(base, blocks_path)
    tuned_parts = resolve_model_parts(tuned, blocks_path)
    base_blocks, tuned_blocks = list(base_parts.blocks), list(tuned_parts.blocks)
    if len(base_blocks) != len(tuned_blocks):
        raise ValueError(
            f"the base model has {len(base_blocks)} blocks and the tuned one "
            f"{len(tuned_blocks)}; localize compares two checkpoints of one architecture"
        )
    width = _matching_width(base_parts, tuned_parts)
    check_same_architecture(base, tuned)
    if width is not None:
        _check_ranks(ranks, width)
    batches = [
        collate_pairs(tokenizer, list(pairs[i : i + batch_size]))
        for i in range(0, len(pairs), batch_size)
    ]
    _check_context(base, batches, batch_size)
    runner = PatchRunner(base, tuned, base_blocks, tuned_blocks, all_tokens)
    count = len(base_blocks)
    with _progress(len(batches) * (count + 2), "patching", progress) as tick:
        measured = [runner.patch_every_block(batch, tick) for batch in batches]
    m_base = torch.cat([m.base for m in measured])
    m_tuned = torch.cat([m.tuned for m in measured])
    m_patched = torch.cat([m.patched for m in measured], dim=1)
    distances = torch.cat([m.distances for m in measured])
    gap = float((m_tuned - m_base).mean())
    if not abs(gap) > 1e-6 * max(1.0, float(m_base.abs().mean())):
        raise ValueError(
            f"the tuned model moves the mean preference margin by {gap:.3g} nats on these "
            f"{len(pairs)} pairs: nothing to localize (is --tuned the fine-tuned checkpoint?)"
        )
    effect, gain, effect_ci, gain_ci = _patch_effects(
        m_base, m_tuned, m_patched, bootstrap, confidence, seed
    )
    ranking = sorted(range(count), key=lambda layer: -gain[layer])
    rank_list = _check_ranks(ranks, runner.width)
    patching_forwards = runner.forwards
    chosen = [layer for layer in ranking[:top_layers] if gain[layer] >= MIN_LOW_RANK_GAIN]
    low_rank = []
    if chosen:
        total = len(batches) * (4 + len(chosen) * len(rank_list))
        with _progress(total, "low rank", progress) as tick:
            bases = runner.delta_directions(batches, chosen, tick)
            directions = {layer: vectors for layer, (vectors, _) in bases.items()}
            margins = runner.low_rank_margins(batches, directions, rank_list, tick)
        low_rank = [
            _recovery(layer, rank_list, margins[layer], m_patched[layer], m_base, bases[layer][1])
            for layer in chosen
        ]
    return Localization(
        layers=list(range(count)),
        pairs=len(pairs),
        margin_base=float(m_base.mean()),
        margin_tuned=float(m_tuned.mean()),
        effect=effect,
        effect_ci=effect_ci,
        gain=gain,
        gain_ci=gain_ci,
        ranking=ranking,
        distance=distances.mean(dim=0).tolist(),
        sparse=sparse_attribution(distances, m_tuned - m_base, seed),
        low_rank=low_rank,
        settings={
            "batch_size": batch_size,
            "all_tokens": all_tokens,
            "bootstrap": bootstrap,
            "confidence": confidence,
            "seed": seed,
            "batches": len(batches),
            "patching_forwards_per_batch": patching_forwards / len(batches),
            "low_rank_forwards_per_batch": (runner.forwards - patching_forwards) / len(batches),
        },
    )


def _check_settings(
    pairs: Sequence[dict[str, str]],
    batch_size: int,
    top_layers: int,
    bootstrap: int,
    confidence: float,
    ranks: Sequence[int] | None,
) -> None:
    check_pair_count(len(pairs))
    if batch_size < 1 or top_layers < 0 or bootstrap < 1:
        raise ValueError(
            f"batch_size >= 1, top_layers >= 0 and bootstrap >= 1 are needed, got {batch_size}, "
            f"{top_layers}, {bootstrap}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if ranks is not None and (not ranks or min(ranks) < 1):
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")


def check_pair_count(count: int) -> None:
    """Raise ``ValueError`` for fewer than ``MIN_PAIRS`` preference pairs, before any model
    is loaded or run."""
    if count < MIN_PAIRS:
        raise ValueError(
            f"localize needs at least {MIN_PAIRS} preference pairs, got {count}: its confidence "
            "intervals resample the pairs, and resamples of one pair all equal it (an interval "
            "of zero width); add pairs (a few dozen give useful intervals)"
        )


def _matching_width(base: ModelParts, tuned: ModelParts) -> int | None:
    """The hidden width of both models (``model_access.hidden_size``; ``None`` if neither
    tells it); ``ValueError`` when the widths or the configs' vocabularies differ."""
    (base_width, base_vocab), (tuned_width, tuned_vocab) = [
        (hidden_size(parts), getattr(getattr(parts.model, "config", None), "vocab_size", None))
        for parts in (base, tuned)
    ]
    if base_width != tuned_width or base_vocab != tuned_vocab:
        raise ValueError(
            f"the base model has width {base_width} and vocabulary {base_vocab}, the tuned one "
            f"{tuned_width} and {tuned_vocab}; localize compares two checkpoints of one "
            "architecture"
        )
    return base_width


def _check_ranks(ranks: Sequence[int] | None, width: int) -> list[int]:
    """``ranks`` sorted (default 1, 2, 4, ..., ``width``); ``ValueError`` beyond the width."""
    rank_list = sorted(set(ranks)) if ranks else _default_ranks(width)
    if any(k < 1 or k > width for k in rank_list):
        raise ValueError(f"ranks must lie in [1, {width}] (the hidden width), got {rank_list}")
    return rank_list


def _recovery(
    layer: int,
    ranks: list[int],
    margins: dict[int, Tensor],
    m_full: Tensor,
    m_base: Tensor,
    shares: Tensor,
) -> LowRankRecovery:
    """Share of block ``layer``'s full patch effect recovered at each rank."""
    full = float((m_full - m_base).mean())
    return LowRankRecovery(
        layer=layer,
        ranks=list(ranks),
        recovered=[float((margins[k] - m_base).mean()) / full if full else math.nan for k in ranks],
        energy=[float(shares[:k].sum()) for k in ranks],
    )


def _check_context(model: nn.Module, batches: list[dict[str, Tensor]], batch_size: int) -> None:
    """Raise ``ValueError`` when a prompt + reply is longer than the model's context."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for index, batch in enumerate(batches):
        lengths = torch.cat([batch[f"{side}_attention"].sum(dim=-1) for side in SIDES])
        if int(lengths.max()) > limit:
            first = index * batch_size
            raise ValueError(
                f"a pair among pairs {first}..{first + batch_size - 1} is {int(lengths.max())} "
                f"tokens long, beyond the model's context of {limit}; shorten it or drop it"
            )


def _default_ranks(width: int) -> list[int]:
    ranks = [2**i for i in range(int(math.log2(width)) + 1)]
    return ranks if ranks[-1] == width else [*ranks, width]


def _patch_effects(
    m_base: Tensor, m_tuned: Tensor, m_patched: Tensor, resamples: int, confidence: float, seed: int
) -> tuple[list[float], list[float], list[tuple[float, float]], list[tuple[float, float]]]:
    """Effect and gain per block, with percentile-bootstrap intervals over pairs."""

    def effects(index: Tensor) -> Tensor:
        gap = (m_tuned[index] - m_base[index]).mean()
        return (m_patched[:, index] - m_base[index]).mean(dim=1) / gap

    def gains(effect: Tensor) -> Tensor:
        return torch.diff(effect, prepend=effect.new_zeros(1))

    everything = torch.arange(m_base.shape[0])
    effect = effects(everything)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, m_base.shape[0], (resamples, m_base.shape[0]), generator=generator)
    sampled = torch.stack([effects(draw) for draw in draws])  # [resamples, L]
    tail = (1 - confidence) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)

    def intervals(values: Tensor) -> list[tuple[float, float]]:
        bounds = torch.nanquantile(values, quantiles, dim=0)
        return [(float(low), float(high)) for low, high in bounds.T]

    return (
        effect.tolist(),
        gains(effect).tolist(),
        intervals(sampled),
        intervals(torch.stack([gains(row) for row in sampled])),
    )


def sparse_attribution(distances: Tensor, gains: Tensor, seed: int = 0) -> SparseAttribution | None:
    """LASSO (``LassoCV``) of ``gains`` ``[n]`` on standardized ``distances`` ``[n, L]``.

    Returns ``None`` for fewer than 5 pairs (too few to cross-validate).

    Raises:
        ImportError: scikit-learn is missing (``pip install spinal-callback[localize]``).
    """
    if distances.shape[0] < 5:
        return None
    try:
        from sklearn.linear_model import LassoCV
        from sklearn.model_selection import KFold
        from sklearn.preprocessing import StandardScaler
    except ImportError as error:
        raise ImportError(
            "the sparse attribution needs scikit-learn: pip install 'spinal-callback[localize]'"
        ) from error
    features = StandardScaler().fit_transform(distances.numpy())
    target = gains.numpy()
    folds = KFold(min(5, distances.shape[0]), shuffle=True, random_state=seed)
    fit = LassoCV(cv=folds, random_state=seed, max_iter=20000).fit(features, target)
    coefficients = [float(c) for c in fit.coef_]
    selected = sorted(
        (i for i, c in enumerate(coefficients) if c != 0.0), key=lambda i: -abs(coefficients[i])
    )
    return SparseAttribution(
        alpha=float(fit.alpha_),
        r2=float(fit.score(features, target)),
        coefficients=coefficients,
        selected=selected,
    )


@contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="fwd", disable=not enabled, leave=False)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
