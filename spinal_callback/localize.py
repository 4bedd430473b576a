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

from spinal_callback.model_access import resolve_model_parts
from spinal_callback.pairs import SIDES, collate_pairs

MIN_LOW_RANK_GAIN = 0.05
"""Blocks whose own share of the effect is below this get no low-rank analysis."""
Patch = Callable[[int, Tensor], Tensor]
"""``(block index, base block output [2b, t, d]) -> replacement``."""


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
        ValueError: mismatched models, no pairs, bad settings, or a tuned model that does not
            move the mean margin (nothing to localize).
    """
    _check_settings(pairs, batch_size, top_layers, bootstrap, confidence)
    base_blocks = list(resolve_model_parts(base, blocks_path).blocks)
    tuned_blocks = list(resolve_model_parts(tuned, blocks_path).blocks)
    if len(base_blocks) != len(tuned_blocks):
        raise ValueError(
            f"the base model has {len(base_blocks)} blocks and the tuned one "
            f"{len(tuned_blocks)}; localize compares two checkpoints of one architecture"
        )
    batches = [
        collate_pairs(tokenizer, list(pairs[i : i + batch_size]))
        for i in range(0, len(pairs), batch_size)
    ]
    _check_context(base, batches, batch_size)
    runner = _Runner(base, tuned, base_blocks, tuned_blocks, all_tokens)
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
    width = runner.width
    rank_list = sorted(set(ranks)) if ranks else _default_ranks(width)
    if any(k < 1 or k > width for k in rank_list):
        raise ValueError(f"ranks must lie in [1, {width}] (the hidden width), got {rank_list}")
    patching_forwards = runner.forwards
    chosen = [layer for layer in ranking[:top_layers] if gain[layer] >= MIN_LOW_RANK_GAIN]
    low_rank = []
    if chosen:
        total = len(batches) * (4 + len(chosen) * len(rank_list))
        with _progress(total, "low rank", progress) as tick:
            low_rank = runner.low_rank(batches, chosen, rank_list, m_patched, m_base, tick)
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
) -> None:
    if not pairs:
        raise ValueError("localize needs at least one preference pair")
    if batch_size < 1 or top_layers < 0 or bootstrap < 1:
        raise ValueError(
            f"batch_size >= 1, top_layers >= 0 and bootstrap >= 1 are needed, got {batch_size}, "
            f"{top_layers}, {bootstrap}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


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


@dataclass
class _Patched:
    base: Tensor  # [b] float64
    tuned: Tensor  # [b] float64
    patched: Tensor  # [L, b] float64
    distances: Tensor  # [b, L] float64


class _Runner:
    """Forwards of the two models with cached block outputs and patch hooks."""

    def __init__(
        self,
        base: nn.Module,
        tuned: nn.Module,
        base_blocks: list[nn.Module],
        tuned_blocks: list[nn.Module],
        all_tokens: bool,
    ) -> None:
        self.base, self.tuned = base, tuned
        self.base_blocks, self.tuned_blocks = base_blocks, tuned_blocks
        self.all_tokens = all_tokens
        self.width = 0
        self.forwards = 0

    def patch_every_block(self, batch: dict[str, Tensor], tick: Callable[[], None]) -> _Patched:
        """``L + 2`` forwards: base and tuned (caching every block output), then each patch."""
        inputs = _sides_stacked(batch)
        positions = _patch_positions(inputs, self.all_tokens)
        base_margin, base_states = self._forward(self.base, inputs, self.base_blocks)
        tick()
        tuned_margin, tuned_states = self._forward(self.tuned, inputs, self.tuned_blocks)
        tick()
        self.width = base_states[0].shape[-1]
        patched = []
        for layer, tuned_state in enumerate(tuned_states):
            replacement = tuned_state.to(base_states[layer].device, base_states[layer].dtype)
            patch = _replace_at(positions, replacement)
            patched.append(self._margin(self.base, inputs, {layer: patch}))
            tick()
        distances = torch.stack(
            [
                _pair_distance(b, t.to(b.device, b.dtype), positions)
                for b, t in zip(base_states, tuned_states)
            ],
            dim=1,
        )
        return _Patched(base_margin, tuned_margin, torch.stack(patched), distances)

    def low_rank(
        self,
        batches: list[dict[str, Tensor]],
        layers: list[int],
        ranks: list[int],
        m_patched: Tensor,
        m_base: Tensor,
        tick: Callable[[], None],
    ) -> list[LowRankRecovery]:
        """Principal directions of each layer's delta (one pass), then rank-k patches."""
        grams = {
            layer: torch.zeros(self.width, self.width, dtype=torch.float64) for layer in layers
        }
        for batch in batches:
            inputs = _sides_stacked(batch)
            positions = _patch_positions(inputs, self.all_tokens)
            for layer, delta in self._deltas(inputs, layers).items():
                rows = delta[positions.to(delta.device)].double().cpu()
                grams[layer] += rows.T @ rows
            tick()
            tick()
        bases = {layer: _principal_directions(gram) for layer, gram in grams.items()}
        changes: dict[int, dict[int, list[Tensor]]] = {
            layer: {k: [] for k in ranks} for layer in layers
        }
        for batch in batches:
            inputs = _sides_stacked(batch)
            positions = _patch_positions(inputs, self.all_tokens)
            deltas = self._deltas(inputs, layers)
            tick()
            tick()
            for layer in layers:
                directions, _ = bases[layer]
                delta = deltas[layer]
                for k in ranks:
                    top = directions[:, :k].to(delta.device, delta.dtype)
                    patch = _add_at(positions, (delta @ top) @ top.T)
                    changes[layer][k].append(self._margin(self.base, inputs, {layer: patch}))
                    tick()
        results = []
        for layer in layers:
            _, energy = bases[layer]
            full = float((m_patched[layer] - m_base).mean())
            recovered = [
                float((torch.cat(changes[layer][k]) - m_base).mean()) / full if full else math.nan
                for k in ranks
            ]
            results.append(
                LowRankRecovery(
                    layer=layer,
                    ranks=list(ranks),
                    recovered=recovered,
                    energy=[float(energy[:k].sum()) for k in ranks],
                )
            )
        return results

    def _deltas(self, inputs: dict[str, Tensor], layers: list[int]) -> dict[int, Tensor]:
        """``h_tuned - h_base`` at the given blocks' outputs, ``[2b, t, d]`` on the base device."""
        _, base_states = self._forward(self.base, inputs, self.base_blocks, layers)
        _, tuned_states = self._forward(self.tuned, inputs, self.tuned_blocks, layers)
        return {
            layer: tuned_states[i].to(base_states[i].device, base_states[i].dtype) - base_states[i]
            for i, layer in enumerate(layers)
        }

    def _forward(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        blocks: list[nn.Module],
        layers: Sequence[int] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Pair margins ``[b]`` and the outputs ``[2b, t, d]`` of ``layers`` (default all)."""
        wanted = list(range(len(blocks))) if layers is None else list(layers)
        states: dict[int, Tensor] = {}

        def keep(index: int, output: Tensor) -> Tensor:
            states[index] = output
            return output

        margin = self._margin(model, inputs, dict.fromkeys(wanted, keep), blocks)
        return margin, [states[layer] for layer in wanted]

    def _margin(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        patches: dict[int, Patch],
        blocks: list[nn.Module] | None = None,
    ) -> Tensor:
        """One forward of ``model`` with ``patches`` on block outputs; pair margins ``[b]``."""
        blocks = self.base_blocks if blocks is None else blocks
        device = next(model.parameters()).device
        on_device = {key: value.to(device) for key, value in inputs.items()}
        self.forwards += 1
        with _block_hooks(blocks, patches), _eval_mode(model), torch.no_grad():
            logits = model(
                input_ids=on_device["ids"], attention_mask=on_device["attention"], use_cache=False
            ).logits
        logps = _reply_logps(logits, on_device["ids"], on_device["response"])
        half = logps.shape[0] // 2
        return (logps[:half] - logps[half:]).double().cpu()


def _replace_at(positions: Tensor, replacement: Tensor) -> Patch:
    """A patch that puts ``replacement`` ``[2b, t, d]`` at ``positions`` ``[2b, t]``."""

    def patch(index: int, output: Tensor) -> Tensor:
        return torch.where(positions.to(output.device)[..., None], replacement, output)

    return patch


def _add_at(positions: Tensor, change: Tensor) -> Patch:
    """A patch that adds ``change`` ``[2b, t, d]`` at ``positions`` ``[2b, t]``."""

    def patch(index: int, output: Tensor) -> Tensor:
        mask = positions.to(output.device)[..., None]
        return torch.where(mask, output + change.to(output.dtype), output)

    return patch


def _sides_stacked(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ids``/``attention``/``response`` ``[2b, t]``: the chosen rows, then the rejected."""
    return {
        key: torch.cat([batch[f"{side}_{key}"] for side in SIDES])
        for key in ("ids", "attention", "response")
    }


def _patch_positions(inputs: dict[str, Tensor], all_tokens: bool) -> Tensor:
    """bool ``[2b, t]``: the positions whose outputs predict a reply token (or every token)."""
    if all_tokens:
        return inputs["attention"].bool()
    positions = torch.zeros_like(inputs["response"], dtype=torch.bool)
    positions[:, :-1] = inputs["response"][:, 1:].bool()
    return positions


def _reply_logps(logits: Tensor, ids: Tensor, response: Tensor) -> Tensor:
    """Summed reply-token log-probs ``[2b]`` (float32, nats) from logits ``[2b, t, V]``."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logps.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * response[:, 1:]).sum(dim=-1)


def _pair_distance(base: Tensor, tuned: Tensor, positions: Tensor) -> Tensor:
    """Per pair, mean L2 distance ``||h_tuned - h_base||`` over both sides' patched positions;
    ``[b]`` float64."""
    mask = positions.to(base.device)
    norms = (tuned.float() - base.float()).norm(dim=-1) * mask
    per_row = norms.sum(dim=-1).double()
    counts = mask.sum(dim=-1).double()
    half = per_row.shape[0] // 2
    return ((per_row[:half] + per_row[half:]) / (counts[:half] + counts[half:]).clamp_min(1)).cpu()


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
        from sklearn.preprocessing import StandardScaler
    except ImportError as error:
        raise ImportError(
            "the sparse attribution needs scikit-learn: pip install 'spinal-callback[localize]'"
        ) from error
    features = StandardScaler().fit_transform(distances.numpy())
    target = gains.numpy()
    folds = min(5, distances.shape[0])
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


def _principal_directions(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of ``gram`` ``[d, d]`` by decreasing eigenvalue (columns), and each
    direction's share of the total energy."""
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)
    values = values[order].clamp_min(0)
    total = values.sum()
    shares = values / total if total > 0 else torch.zeros_like(values)
    return vectors[:, order], shares


@contextmanager
def _block_hooks(blocks: list[nn.Module], patches: dict[int, Patch]) -> Iterator[None]:
    """Forward hooks that pass each patched block's hidden-state output through its patch."""

    def hook_for(index: int, patch: Patch) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, (tuple, list)):
                return type(output)([patch(index, output[0]), *output[1:]])
            return patch(index, output)

        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i, p)) for i, p in patches.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in training.items():
            module.train(mode)


@contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="fwd", disable=not enabled, leave=False)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
