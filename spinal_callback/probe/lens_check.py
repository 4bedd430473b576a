"""The logit lens must be the model's own head: a check made once, before the first probe.

The lens maps a block's output through the final norm and the head (``ModelParts.lens_logits``).
Some models transform the head's output before returning it: Cohere multiplies the logits by
``logit_scale``, Granite divides them by ``logits_scaling``, Falcon-H1 multiplies them by
``lm_head_multiplier``. A lens that misses such a factor measures every block at the wrong
temperature: its transport, entropies and next-token NLL are then not the model's. Applied to the
last block's output, the lens must give the logits the model returns, up to one constant factor
(which then becomes the model's logit scale) and a constant per token (which no softmax sees).
Anything else is an error that says so.

The comparison is made on logits centred per token: ``y = s * x + residual``, with ``s`` fitted
by least squares. Its relative residual ``|residual| / |y|`` is about 1e-7 in float32 and at most
a few 1e-3 from 16-bit rounding; a head the lens does not reproduce leaves a residual of order 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from spinal_callback.probe.model_access import ModelAccessError, ModelParts

__all__ = [
    "LENS_CHECK_TOKENS",
    "RESIDUAL_TOLERANCE",
    "SCALE_RESOLUTION",
    "LogitFit",
    "fit_logits",
    "largest_gap",
    "measured_logit_scale",
    "same_logit_scale",
]

LENS_CHECK_TOKENS = 16
"""Tokens of the probe's longest row that the check runs the model on."""

RESIDUAL_TOLERANCE = 0.05
"""The largest relative residual of the model's centred logits after the best constant scale
of the lens's: 16-bit rounding stays below 0.02 even for logits far from zero."""

SCALE_RESOLUTION = 1e-3
"""A fitted scale within this of 1 is no scale: the lens is taken as it is."""


class LogitFit(NamedTuple):
    """``model = scale * lens + c_token + residual`` over centred ``[n, V]`` logits.

    Attributes:
        scale: the least-squares factor ``s``.
        residual: ``|residual| / |centred model logits|``, a number >= 0 (0: exact).
    """

    scale: float
    residual: float


def fit_logits(lens: Tensor, model_logits: Tensor) -> LogitFit:
    """Least-squares ``s`` in ``model_logits = s * lens + c`` with one ``c`` per token (a
    per-token constant leaves a softmax unchanged), and the relative residual; ``[n, V]``
    inputs of any float dtype, computed in float64."""
    x = lens.double() - lens.double().mean(-1, keepdim=True)
    y = model_logits.double() - model_logits.double().mean(-1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny
    scale = (x * y).sum() / (x * x).sum().clamp_min(tiny)
    residual = (y - scale * x).norm() / y.norm().clamp_min(tiny)
    return LogitFit(float(scale), float(residual))


def largest_gap(lens_logits: Tensor, model_logits: Tensor) -> float:
    """The largest total-variation distance, over tokens, between the softmaxes of two
    ``[n, V]`` logit tensors (computed in float64; a number in [0, 1])."""
    p = torch.softmax(lens_logits.double(), dim=-1)
    q = torch.softmax(model_logits.double(), dim=-1)
    return float(0.5 * (p - q).abs().sum(-1).max())


def measured_logit_scale(parts: ModelParts, lens: Tensor, model_logits: Tensor) -> float | None:
    """The factor the model applies to its head's logits, from one forward's last block.

    Args:
        parts: the resolved model, its ``logit_scale`` not yet set.
        lens: ``[n, V]`` ``parts.lens_logits`` of the last block's output.
        model_logits: ``[m, V]`` the logits the model returned for the same tokens, or for the
            last ``m < n`` of them (a model that returns the last positions only).

    Returns:
        ``None`` when the lens already gives the model's logits; else the scale ``s > 0`` with
        which it does (to ``RESIDUAL_TOLERANCE``).

    Raises:
        ModelAccessError: the lens gives another vocabulary, or no single scale makes its
            logits the model's; the message gives the gap and what to do.
    """
    if lens.shape[-1] != model_logits.shape[-1]:
        raise ModelAccessError(
            f"the logit lens gives {lens.shape[-1]} logits per token and the model returns "
            f"{model_logits.shape[-1]}: the head found ({parts.paths['head']}) is not the one "
            "the model returns its logits from. Pass SpinalConfig(head_path=...) naming the "
            "module that maps hidden states to the model's logits"
        )
    compared = min(lens.shape[0], model_logits.shape[0])  # the last positions, where fewer
    lens, model_logits = lens[-compared:], model_logits[-compared:]
    fit = fit_logits(lens, model_logits)
    scaled = fit.residual <= RESIDUAL_TOLERANCE and fit.scale > 0
    if scaled and abs(fit.scale - 1.0) <= SCALE_RESOLUTION:
        return None
    if scaled and parts.logit_softcap is None:
        return fit.scale
    if scaled:
        problem = (
            f"they differ by a factor of {fit.scale:.4g} on top of the soft cap, which the lens "
            "cannot apply before it"
        )
    else:
        problem = (
            f"they differ by up to {largest_gap(lens, model_logits):.3f} in total variation, "
            f"and no constant logit scale closes the gap (relative residual {fit.residual:.2f})"
        )
    raise ModelAccessError(
        f"the logit lens of the last block ({parts.paths['final_norm']} then "
        f"{parts.paths['head']}) does not give the model's next-token distribution: {problem}. "
        f"{type(parts.model).__name__} transforms its head's output in a way spinal-callback "
        "does not know; pass SpinalConfig(final_norm_path=..., head_path=...) naming modules "
        "that map the last block's output to the model's logits"
    )


def same_logit_scale(first: float | None, second: float | None) -> bool:
    """Whether two traces' ``metadata["logit_scale"]`` (a float, or ``None``/absent for no
    scale) are one model's: both none, or within 1% (a refit in bfloat16 moves the third
    digit)."""
    if first is None or second is None:
        return first is second
    return abs(float(first) - float(second)) <= 0.01 * abs(float(second))
