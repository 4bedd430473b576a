"""Per-layer drift: how far each decoder block's output has moved from the reference's.

During DPO the policy starts as a copy of the reference; the drift of block ``l`` is

    drift_l = mean_i ||h_policy_l(i) - h_ref_l(i)||_2 / mean_i ||h_ref_l(i)||_2

over a fixed subsample of real probe tokens ``i``, where ``h_l(i)`` is block ``l``'s output
(the hidden state after the block) at token ``i``, in float32. It is dimensionless: 0 means the
block's output has not moved, 0.1 that it moved by a tenth of its typical size. Unlike the depth
trace it covers every block, so it shows which layers DPO is rewriting.

This module holds the math, the one hooked forward and ``DriftMeter``, which owns the drift's
reference and its round-trip through checkpoints; the runner decides when to measure.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spinal_callback.atomic import replace_atomically
from spinal_callback.probe.batch import ProbeBatch
from spinal_callback.probe.capture import (
    autocast_context,
    capture_block_outputs,
    device_of,
    eval_mode,
    forward_inputs,
)
from spinal_callback.probe.model_access import ModelParts, resolve_model_parts
from spinal_callback.probe.sharding import root_parameters_whole

logger = logging.getLogger("spinal_callback")
DRIFT_PREFIX = "spinal/drift"
DRIFT_TOKENS = 64
"""Probe tokens the drift averages over: enough for a mean of norms. A cached policy snapshot is
``blocks x tokens x hidden`` float32 (8 MiB for 16 blocks of width 2048), so the drift meter keeps
it in a safetensors file next to the event log and puts only its path and hash in checkpoints."""


def block_outputs(
    model: nn.Module | ModelParts,
    batch: ProbeBatch,
    token_index: Tensor,
    autocast_dtype: str | None = None,
) -> Tensor:
    """Every decoder block's output at the chosen probe tokens.

    One no-grad forward in eval mode (each module's train/eval flag restored afterwards), without
    KV cache, with positions counted over real tokens as in the probe; it stops after the last
    block, so the unembedding never runs.

    Args:
        model: a causal LM (wrappers are looked through with the automatic lookup) or its
            ``ModelParts`` (e.g. ``SpinalProbe.parts``, which honours configured paths).
        batch: the probe batch.
        token_index: int64 ``[n]`` flat indices into ``[b * t]`` of real tokens, e.g.
            ``batch.subsample(count, seed)``.
        autocast_dtype: ``"bfloat16"``/``"float16"`` to run the forward under autocast, or
            ``None`` (the model's own dtype).

    Returns:
        float32 ``[L, n, d]`` block outputs (``L`` = all blocks) on the model's device.
    """
    parts = model if isinstance(model, ModelParts) else resolve_model_parts(model)
    device = device_of(parts.model)
    inputs = {name: value.to(device) for name, value in forward_inputs(parts, batch).items()}
    layers = list(range(parts.num_blocks))
    autocast = autocast_context(device, autocast_dtype)
    # no_grad, not inference_mode, for the FSDP reason given in SpinalProbe.run; a sharded
    # root's parameters whole for the forward, on every rank (sharding).
    with torch.no_grad(), root_parameters_whole(parts.entry), eval_mode(parts.entry), autocast:
        (hidden,) = capture_block_outputs(parts, inputs, layers, [token_index.to(device)])
    return hidden.float()


def activation_drift(policy: Tensor, reference: Tensor) -> Tensor:
    """Relative drift of each block's output from the reference's (the module docstring's
    ``drift_l``).

    Args:
        policy: ``[L, n, d]`` block outputs of the policy.
        reference: ``[L, n, d]`` block outputs of the reference at the same tokens.

    Returns:
        float32 ``[L]`` on ``policy``'s device, dimensionless and >= 0; 0 where the block has not
        moved (also when its reference outputs are all zero), ``inf`` where a block whose
        reference outputs are all zero has moved, NaN where an activation is not finite.

    Raises:
        ValueError: the shapes differ or are not ``[L, n, d]``.
    """
    if policy.ndim != 3 or policy.shape != reference.shape:
        raise ValueError(
            "activation_drift needs policy and reference block outputs of one [blocks, tokens, "
            f"hidden] shape, got {tuple(policy.shape)} and {tuple(reference.shape)}"
        )
    policy = policy.float()
    reference = reference.to(device=policy.device, dtype=torch.float32)
    moved = torch.linalg.vector_norm(policy - reference, dim=-1).mean(dim=-1)
    size = torch.linalg.vector_norm(reference, dim=-1).mean(dim=-1)
    return torch.where(moved == 0, torch.zeros_like(moved), moved / size)


def drift_scalars(drift: Tensor) -> dict[str, float]:
    """``{"spinal/drift/L{ii}": value}`` for a ``[L]`` drift, as Python floats.

    Block indices are zero-padded to 2 digits, or to the digits of ``L`` when ``L >= 100``, so the
    tags sort in depth order.
    """
    width = max(2, len(str(drift.numel())))
    values = drift.detach().float().cpu().tolist()
    return {f"{DRIFT_PREFIX}/L{layer:0{width}d}": value for layer, value in enumerate(values)}


def encode_activations(activations: Tensor) -> dict[str, Any]:
    """A float32 tensor as JSON types: its shape and its little-endian bytes in base64 (exact,
    and about a quarter of the size of nested lists)."""
    array = activations.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return {
        "shape": list(array.shape),
        "dtype": "float32",
        "base64": base64.b64encode(array.astype("<f4").tobytes()).decode("ascii"),
    }


def decode_activations(encoded: dict[str, Any]) -> Tensor:
    """The float32 CPU tensor ``encode_activations`` encoded.

    Raises:
        ValueError: the dtype is not float32 or the byte count does not match the shape.
    """
    shape = [int(size) for size in encoded["shape"]]
    if encoded.get("dtype") != "float32":
        raise ValueError(f"stored activations must be float32, got {encoded.get('dtype')!r}")
    data = base64.b64decode(encoded["base64"])
    if len(data) != 4 * int(np.prod(shape)):
        raise ValueError(
            f"stored activations hold {len(data)} bytes, expected {4 * int(np.prod(shape))} for "
            f"float32 of shape {shape}; the state is corrupted"
        )
    array = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    return torch.from_numpy(array)


def save_activations(path: str | Path, activations: Tensor) -> str:
    """Write float32 ``activations`` to a safetensors file (atomically); returns its sha256."""
    tensor = activations.detach().to(device="cpu", dtype=torch.float32).contiguous()
    target = replace_atomically(path, lambda partial: save_file({"activations": tensor}, partial))
    return hashlib.sha256(target.read_bytes()).hexdigest()


def load_activations(path: str | Path, sha256: str) -> Tensor:
    """Read what ``save_activations`` wrote.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's sha256 differs from ``sha256`` (changed or corrupted).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no stored drift reference at {source}")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{source} has changed since it was saved (sha256 {digest[:12]}...)")
    return load_file(str(source))["activations"]


class DriftMeter:
    """Per-layer drift during training: its probe tokens, its reference, its file, its state.

    The reference's block outputs are measured once, at the first measurement: TRL's
    ``ref_model``, else the PEFT policy with adapters off, else the policy itself (a *snapshot*
    of the run's start). Only a snapshot must survive a resume (a reference model is measured
    again); it is kept in a safetensors file (``path``) and checkpoints hold its path and sha256,
    or the tensor inline (base64) when there is no file.

    Args:
        batch: the probe batch; ``DRIFT_TOKENS`` of its real tokens are fixed here (seeded).
        seed: seed of that token subsample.
        autocast_dtype: as ``SpinalConfig.autocast_dtype``.
    """

    def __init__(self, batch: ProbeBatch, seed: int, autocast_dtype: str | None = None) -> None:
        self.batch = batch
        self.token_index = batch.subsample(DRIFT_TOKENS, seed)
        self.autocast_dtype = autocast_dtype
        self.fingerprint = _tokens_fingerprint(batch, self.token_index)
        self.path: Path | None = None
        self.reference: Tensor | None = None
        self.reference_is_snapshot = False
        self.reference_fingerprint: str | None = None
        self.reference_sha256: str | None = None
        self.last: Tensor | None = None
        """The latest measured drift, float32 ``[blocks]`` on the CPU."""

    def outputs_of(self, parts: ModelParts) -> Tensor:
        """float32 ``[blocks, DRIFT_TOKENS, hidden]`` block outputs of ``parts`` on the drift
        tokens (``block_outputs``)."""
        return block_outputs(parts, self.batch, self.token_index, self.autocast_dtype).float()

    def measure(self, policy: ModelParts, reference: Callable[[], Tensor | None]) -> Tensor:
        """float32 ``[blocks]`` drift of ``policy`` from the reference, on the CPU.

        ``reference`` returns the reference's ``outputs_of`` (``None``: the policy is its own
        snapshot); it is called only when no matching reference is cached.
        """
        now = self.outputs_of(policy)
        self.last = activation_drift(now, self._reference(now, reference)).cpu()
        return self.last

    def _reference(self, policy: Tensor, source: Callable[[], Tensor | None]) -> Tensor:
        stored = self.reference
        if stored is not None and (
            self.reference_fingerprint != self.fingerprint or stored.shape != policy.shape
        ):
            logger.warning(
                "spinal-callback: the stored drift reference was measured on other probe tokens "
                "or another model; measuring the reference again"
            )
            self.reference = None
        if self.reference is None:
            measured = source()
            self.reference_is_snapshot = measured is None
            self.reference = (policy if measured is None else measured).cpu()
            self.reference_fingerprint = self.fingerprint
            self.reference_sha256 = None
            if self.reference_is_snapshot and self.path is not None:
                self.reference_sha256 = save_activations(self.path, self.reference)
        return self.reference

    def state_dict(self) -> dict[str, Any] | None:
        """The snapshot reference (file path and sha256, or inline), or ``None``."""
        if self.reference is None or not self.reference_is_snapshot:
            return None
        stored = (
            {"file": str(self.path), "sha256": self.reference_sha256}
            if self.reference_sha256 is not None
            else encode_activations(self.reference)
        )
        return {"fingerprint": self.reference_fingerprint, **stored}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore ``state_dict``'s entry; a missing or changed file means a new reference
        (with a warning) at the next measurement. The file the entry names is only read (and
        only a ``.safetensors`` file whose sha256 matches); the reference is written to this
        run's own ``path`` (``attach``)."""
        self.reference = _stored_reference(state) if state else None
        self.reference_is_snapshot = self.reference is not None
        self.reference_sha256 = None
        if state and self.reference is not None:
            self.reference_fingerprint = state.get("fingerprint")
        if self.path is not None:
            self.attach(self.path)

    def attach(self, path: str | Path) -> None:
        """Keep the snapshot reference in ``path`` (the run's own file) from now on; a restored
        snapshot is written there at once (an ``OSError`` is logged: the state then holds it
        inline)."""
        self.path = Path(path)
        if self.reference is None or not self.reference_is_snapshot:
            return
        try:
            self.reference_sha256 = save_activations(self.path, self.reference)
        except OSError as error:
            logger.error("spinal-callback: cannot write the drift reference %s (%s)", path, error)
            self.reference_sha256 = None


def _stored_reference(entry: dict[str, Any]) -> Tensor | None:
    if "file" not in entry:
        return decode_activations(entry)
    if Path(str(entry["file"])).suffix != ".safetensors":
        logger.warning(
            "spinal-callback: the checkpoint names %s as its drift reference, which is not a "
            ".safetensors file; drift is measured against a new reference",
            entry["file"],
        )
        return None
    try:
        return load_activations(entry["file"], entry["sha256"])
    except (FileNotFoundError, ValueError) as error:
        logger.warning("spinal-callback: %s; drift is measured against a new reference", error)
        return None


def _tokens_fingerprint(batch: ProbeBatch, token_index: Tensor) -> str:
    """Hash of the probe's token ids, mask and chosen tokens: a stored reference is comparable
    only when it matches."""
    digest = hashlib.sha256()
    for tensor in (batch.input_ids, batch.attention_mask, token_index):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]
