"""The forwards behind ``localize``: a base and a tuned model run on the same pair batches with
forward hooks that cache or replace block outputs (the residual stream after each block).

Inputs are right-padded pair batches from ``pairs.collate_pairs``; each forward stacks the chosen
rows, then the rejected rows (``[2b, t]``). Margins are summed reply-token log-prob differences,
chosen minus rejected, in nats (float64 on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback.probe.capture import eval_mode
from spinal_callback.probe.model_access import unwrap_model
from spinal_callback.tools.pairs import SIDES, reply_logps

Patch = Callable[[int, Tensor], Tensor]
"""``(block index, block output [2b, t, d]) -> replacement``."""


@dataclass
class PatchedBatch:
    """Margins (nats, float64, CPU) of one batch of pairs, and per-pair block distances."""

    base: Tensor  # [b] float64
    tuned: Tensor  # [b] float64
    patched: Tensor  # [L, b] float64
    distances: Tensor  # [b, L] float64


class PatchRunner:
    """Forwards of a base and a tuned model with block-output hooks; counts its forwards."""

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

    def patch_every_block(self, batch: dict[str, Tensor], tick: Callable[[], None]) -> PatchedBatch:
        """``L + 2`` forwards: base and tuned (caching every block output), then each patch."""
        inputs = sides_stacked(batch)
        positions = patch_positions(inputs, self.all_tokens)
        base_margin, base_states = self._forward(self.base, inputs, self.base_blocks)
        tick()
        tuned_margin, tuned_states = self._forward(self.tuned, inputs, self.tuned_blocks)
        tick()
        self.width = base_states[0].shape[-1]
        patched = []
        for layer, tuned_state in enumerate(tuned_states):
            replacement = tuned_state.to(base_states[layer].device, base_states[layer].dtype)
            patch = replace_at(positions, replacement)
            patched.append(self._margin(self.base, inputs, {layer: patch}))
            tick()
        distances = torch.stack(
            [
                pair_distance(b, t.to(b.device, b.dtype), positions)
                for b, t in zip(base_states, tuned_states)
            ],
            dim=1,
        )
        return PatchedBatch(base_margin, tuned_margin, torch.stack(patched), distances)

    def delta_directions(
        self, batches: list[dict[str, Tensor]], layers: list[int], tick: Callable[[], None]
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Per block, the uncentered principal directions of ``h_tuned - h_base`` over the
        patched positions of all batches (2 forwards per batch): float64 ``[d, d]`` eigenvectors
        by decreasing eigenvalue (columns), and each direction's share of the squared norm."""
        grams = {
            layer: torch.zeros(self.width, self.width, dtype=torch.float64) for layer in layers
        }
        for batch in batches:
            inputs = sides_stacked(batch)
            positions = patch_positions(inputs, self.all_tokens)
            for layer, delta in self._deltas(inputs, layers).items():
                rows = delta[positions.to(delta.device)].double().cpu()
                grams[layer] += rows.T @ rows
            tick()
            tick()
        return {layer: principal_directions(gram) for layer, gram in grams.items()}

    def low_rank_margins(
        self,
        batches: list[dict[str, Tensor]],
        directions: dict[int, Tensor],
        ranks: list[int],
        tick: Callable[[], None],
    ) -> dict[int, dict[int, Tensor]]:
        """Per block and rank ``k``, the pair margins ``[n]`` of the base model with the delta's
        projection on its top ``k`` directions added at the patched positions
        (``2 + len(directions) * len(ranks)`` forwards per batch)."""
        margins: dict[int, dict[int, list[Tensor]]] = {
            layer: {k: [] for k in ranks} for layer in directions
        }
        for batch in batches:
            inputs = sides_stacked(batch)
            positions = patch_positions(inputs, self.all_tokens)
            deltas = self._deltas(inputs, list(directions))
            tick()
            tick()
            for layer, basis in directions.items():
                delta = deltas[layer]
                for k in ranks:
                    top = basis[:, :k].to(delta.device, torch.float32)
                    change = (delta.float() @ top) @ top.T
                    patch = add_at(positions, change)
                    margins[layer][k].append(self._margin(self.base, inputs, {layer: patch}))
                    tick()
        return {
            layer: {k: torch.cat(parts) for k, parts in by_rank.items()}
            for layer, by_rank in margins.items()
        }

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
        with block_hooks(blocks, patches), eval_mode(model), torch.no_grad():
            logits = model(
                input_ids=on_device["ids"], attention_mask=on_device["attention"], use_cache=False
            ).logits
        logps = reply_logps(logits, on_device["ids"], on_device["response"])
        half = logps.shape[0] // 2
        return (logps[:half] - logps[half:]).double().cpu()


def check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    """Raise unless ``tuned`` is ``base``'s architecture with the same parameter layout.

    Patching puts one model's residual stream into the other, which only means something when
    the tuned model is a fine-tune of the base. Wrappers (DDP, ``torch.compile``, PEFT) are
    looked through, and an unmerged PEFT adapter's layers count as the layers they adapt.

    Raises:
        ValueError: naming the first mismatch: the ``config.model_type`` or class, then a
            parameter only one model has, then a parameter whose shapes differ.
    """
    base_model, tuned_model = unwrap_model(base), unwrap_model(tuned)
    kinds = [_architecture(model) for model in (base_model, tuned_model)]
    if kinds[0] != kinds[1]:
        raise ValueError(
            f"the base model is a {kinds[0]} and the tuned one a {kinds[1]}; localize compares a "
            "fine-tuned checkpoint with the base it was tuned from: pass checkpoints of one "
            "architecture"
        )
    base_shapes, tuned_shapes = _parameter_shapes(base_model), _parameter_shapes(tuned_model)
    for name, shape in base_shapes.items():
        if name not in tuned_shapes:
            raise ValueError(
                f"the base model has a parameter {name!r} {shape} that the tuned one lacks; "
                "pass checkpoints of one architecture and configuration"
            )
        if tuned_shapes[name] != shape:
            raise ValueError(
                f"parameter {name!r} has shape {shape} in the base model and "
                f"{tuned_shapes[name]} in the tuned one; pass checkpoints of one configuration"
            )
    extra = [name for name in tuned_shapes if name not in base_shapes]
    if extra:
        raise ValueError(
            f"the tuned model has a parameter {extra[0]!r} {tuned_shapes[extra[0]]} that the base "
            "one lacks; pass checkpoints of one architecture and configuration"
        )


def _architecture(model: nn.Module) -> str:
    """``"<model_type> (<class name>)"``, e.g. ``"llama (LlamaForCausalLM)"``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{model_type or 'model'} ({type(model).__name__})"


def _parameter_shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every parameter's dotted name and shape, in registration order; tied weights appear
    under each name, and a PEFT layer is replaced by the ``base_layer`` it adapts."""
    base_layer = module._modules.get("base_layer")
    if base_layer is not None:
        return _parameter_shapes(base_layer, prefix)
    shapes = {
        prefix + name: tuple(parameter.shape)
        for name, parameter in module.named_parameters(recurse=False)
    }
    for name, child in module.named_children():
        shapes.update(_parameter_shapes(child, f"{prefix}{name}."))
    return shapes


def replace_at(positions: Tensor, replacement: Tensor) -> Patch:
    """A patch that puts ``replacement`` ``[2b, t, d]`` at ``positions`` ``[2b, t]``."""

    def patch(index: int, output: Tensor) -> Tensor:
        return torch.where(positions.to(output.device)[..., None], replacement, output)

    return patch


def add_at(positions: Tensor, change: Tensor) -> Patch:
    """A patch that adds float32 ``change`` ``[2b, t, d]`` at ``positions`` ``[2b, t]`` (summed
    in float32, then cast to the block's dtype)."""

    def patch(index: int, output: Tensor) -> Tensor:
        mask = positions.to(output.device)[..., None]
        summed = (output.float() + change.to(output.device)).to(output.dtype)
        return torch.where(mask, summed, output)

    return patch


def sides_stacked(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ids``/``attention``/``response`` ``[2b, t]``: the chosen rows, then the rejected."""
    return {
        key: torch.cat([batch[f"{side}_{key}"] for side in SIDES])
        for key in ("ids", "attention", "response")
    }


def patch_positions(inputs: dict[str, Tensor], all_tokens: bool) -> Tensor:
    """bool ``[2b, t]``: the positions whose outputs predict a reply token (or every token)."""
    if all_tokens:
        return inputs["attention"].bool()
    positions = torch.zeros_like(inputs["response"], dtype=torch.bool)
    positions[:, :-1] = inputs["response"][:, 1:].bool()
    return positions


def pair_distance(base: Tensor, tuned: Tensor, positions: Tensor) -> Tensor:
    """Per pair, mean L2 distance ``||h_tuned - h_base||`` over both sides' patched positions;
    ``[b]`` float64."""
    mask = positions.to(base.device)
    norms = (tuned.float() - base.float()).norm(dim=-1) * mask
    per_row = norms.sum(dim=-1).double()
    counts = mask.sum(dim=-1).double()
    half = per_row.shape[0] // 2
    return ((per_row[:half] + per_row[half:]) / (counts[:half] + counts[half:]).clamp_min(1)).cpu()


def principal_directions(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of ``gram`` ``[d, d]`` by decreasing eigenvalue (columns), and each
    direction's share of the total energy."""
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)
    values = values[order].clamp_min(0)
    total = values.sum()
    shares = values / total if total > 0 else torch.zeros_like(values)
    return vectors[:, order], shares


@contextmanager
def block_hooks(blocks: list[nn.Module], patches: dict[int, Patch]) -> Iterator[None]:
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
