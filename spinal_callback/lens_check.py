"""The logit lens must be the model's own head: a check made once, before the first probe.

The lens maps a block's output through the final norm and the head (``ModelParts.lens_logits``).
Some models transform the head's output before returning it: Cohere multiplies the logits by
``logit_scale``, Granite divides them by ``logits_scaling``, others scale the hidden state ahead of
the head. A lens that misses such a factor measures every block at the wrong temperature: its
transport, entropies and next-token NLL are then not the model's. Applied to the last block's
output, the lens must give the logits the model returns; where it does not and one constant
factor makes it, that factor is the model's logit scale. Anything else is an error that says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spinal_callback.model_access import ModelAccessError, ModelParts

__all__ = ["LENS_CHECK_TOKENS", "LENS_CHECK_TOLERANCE", "largest_gap", "measured_logit_scale"]

LENS_CHECK_TOKENS = 16
"""Tokens of the first probe row the check runs the model on."""

LENS_CHECK_TOLERANCE = 0.01
"""The largest total-variation distance allowed between the lens of the last block and the
model's own next-token distribution, at any token (float rounding in bfloat16 stays far below;
a missed temperature of 8 on a random-initialised model is above 0.1)."""


def largest_gap(lens_logits: Tensor, model_logits: Tensor) -> float:
    """The largest total-variation distance, over tokens, between the softmaxes of two
    ``[n, V]`` logit tensors (computed in float64; a number in [0, 1])."""
    p = torch.softmax(lens_logits.double(), dim=-1)
    q = torch.softmax(model_logits.double(), dim=-1)
    return float(0.5 * (p - q).abs().sum(-1).max())


def fitted_logit_scale(raw: Tensor, model_logits: Tensor) -> float:
    """The least-squares ``s`` in ``model_logits = s * raw + c`` with one ``c`` per token (a
    per-token constant leaves a softmax unchanged); ``[n, V]`` inputs, float64 fit."""
    x = raw.double() - raw.double().mean(-1, keepdim=True)
    y = model_logits.double() - model_logits.double().mean(-1, keepdim=True)
    return float((x * y).sum() / (x * x).sum().clamp_min(torch.finfo(torch.float64).tiny))


def measured_logit_scale(parts: ModelParts, lens: Tensor, model_logits: Tensor) -> float | None:
    """The factor the model applies to its head's logits, from one forward's last block.

    Args:
        parts: the resolved model, its ``logit_scale`` not yet set.
        lens: ``[n, V]`` ``parts.lens_logits`` of the last block's output.
        model_logits: ``[n, V]`` the logits the model returned for the same tokens.

    Returns:
        ``None`` when the lens already gives the model's distribution (within
        ``LENS_CHECK_TOLERANCE``); else the scale ``s > 0`` with which it does.

    Raises:
        ModelAccessError: the lens gives another vocabulary, or no single scale makes its
            distribution the model's; the message gives the gap and how to point the lens at
            the right modules.
    """
    raw = lens
    if raw.shape != model_logits.shape:
        raise ModelAccessError(
            f"the logit lens gives {tuple(raw.shape)} logits for {raw.shape[0]} tokens, the "
            f"model {tuple(model_logits.shape)}: the head found ({parts.paths['head']}) is not "
            "the one the model returns its logits from. Pass SpinalConfig(head_path=...) naming "
            "the module that maps hidden states to the model's logits"
        )
    gap = largest_gap(raw, model_logits)
    if gap <= LENS_CHECK_TOLERANCE:
        return None
    scale = None if parts.logit_softcap is not None else fitted_logit_scale(raw, model_logits)
    if scale is not None and scale > 0:
        scaled_gap = largest_gap(raw.double() * scale, model_logits)
        if scaled_gap <= LENS_CHECK_TOLERANCE:
            return scale
    raise ModelAccessError(
        f"the logit lens of the last block ({parts.paths['final_norm']} then "
        f"{parts.paths['head']}) does not give the model's next-token distribution: they differ "
        f"by up to {gap:.3f} in total variation, and no constant logit scale closes the gap. "
        f"{type(parts.model).__name__} transforms its head's output in a way spinal-callback "
        "does not know; pass SpinalConfig(final_norm_path=..., head_path=...) naming modules "
        "that map the last block's output to the model's logits"
    )
