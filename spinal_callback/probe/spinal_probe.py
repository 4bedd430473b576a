"""SpinalProbe: one hooked forward over the probe batch -> a late-layer ``DepthTrace``.

The probe may carry a second group of texts, neutral text the run does not train on, stacked
into the same forward: its trace (``DepthTrace.neutral``) tells whether the model changes on text
outside the task, which healthy DPO barely touches and a damaging run rewrites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from spinal_callback.config import SpinalConfig
from spinal_callback.distributed import every_rank
from spinal_callback.probe.batch import ProbeBatch
from spinal_callback.probe.capture import (
    autocast_context,
    capture_block_outputs,
    device_of,
    eval_mode,
    forward_inputs,
    lens_and_model_logits,
)
from spinal_callback.probe.lens import MIN_SEQUENTIAL_TOKENS, LensStatistics, lens_statistics
from spinal_callback.probe.lens_check import LENS_CHECK_TOKENS, measured_logit_scale
from spinal_callback.probe.metrics import (
    RAMP_SUMMARY_NAMES,
    contraction_scores,
    ramp_summaries,
    tail_band,
)
from spinal_callback.probe.model_access import (
    HIDDEN_SIZE_NAMES,
    ModelParts,
    hidden_size,
    resolve_model_parts,
)
from spinal_callback.probe.sharding import root_parameters_whole
from spinal_callback.probe.trace import DepthTrace

__all__ = ["MIN_LATE_BAND", "ProbeBatch", "SpinalProbe", "late_band"]

MAX_PADDING_WASTE = 0.25
"""Padding, as a share of the groups' own positions, above which the groups (task prompts,
neutral texts) run as separate forwards instead of one stacked forward."""

MIN_LATE_BAND = 4
GROUP_NAMES = ("task", "neutral")

LENS_CHECK_ATTEMPTS = 3
"""Runs that may try the lens check on non-finite logits before it is given up as unverified."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Group:
    """One group of probe texts inside the stacked forward batch.

    Attributes:
        batch: the group's own batch (its subsamples depend on it alone).
        spectrum_index, transport_index: int64 flat indices into the stacked ``[b * t]``.
        own_spectrum_index, own_transport_index: the same tokens as flat indices into the
            group's own ``[b * t]`` (when the groups run as separate forwards).
        targets: int64 ``[n_transport]``, the real next token of each transport token, -1 at
            the end of a row.
    """

    batch: ProbeBatch
    spectrum_index: Tensor
    transport_index: Tensor
    targets: Tensor
    own_spectrum_index: Tensor
    own_transport_index: Tensor

    @property
    def has_targets(self) -> bool:
        return bool((self.targets >= 0).any())


def late_band(num_blocks: int, late_layers: Sequence[int] | None = None) -> list[int]:
    """Block indices to trace: ``late_layers`` normalised, or the default late band.

    The default is the last ``ceil(num_blocks / 3)`` blocks, at least 4, at most ``num_blocks``.

    Raises:
        ValueError: fewer than 2 blocks to trace (transport is between adjacent blocks).
    """
    if num_blocks < 2:
        raise ValueError(
            f"the model has {num_blocks} decoder block(s); a depth trace needs at least 2 "
            "(transport is measured between adjacent blocks), so this model cannot be probed"
        )
    if late_layers is None:
        count = min(num_blocks, max(MIN_LATE_BAND, math.ceil(num_blocks / 3)))
        return list(range(num_blocks - count, num_blocks))
    out_of_range = [i for i in late_layers if not -num_blocks <= i < num_blocks]
    if out_of_range:
        raise ValueError(
            f"late_layers {out_of_range} out of range for a model with {num_blocks} blocks "
            f"(use 0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)"
        )
    layers = sorted({i % num_blocks for i in late_layers})
    if len(layers) < 2:
        raise ValueError(
            f"late_layers must name at least 2 distinct blocks, got {list(late_layers)}"
        )
    return layers


class SpinalProbe:
    """Runs the probe batch through a model and returns its late-layer ``DepthTrace``.

    Everything that can be wrong (unresolvable architecture, band out of range, probe longer
    than the context, too few tokens for the spectrum) raises ``ValueError`` here, at setup.

    Args:
        model: a Hugging Face causal LM, possibly wrapped in PEFT, DDP, FSDP or ``torch.compile``.
        batch: the fixed probe (the task's prompts).
        config: score and band settings (default ``SpinalConfig()``).
        neutral: an optional second fixed batch of neutral text (text the run does not train
            on), stacked into the same forward; its trace is ``DepthTrace.neutral``.
        lens_tokens: another probe's ``lens_tokens`` (of the same batches and config), shared:
            whichever probe runs first settles the lens's sample size for both, so that the
            traces of two models (a run's reference and its policy, or two checkpoints) measure
            the same tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: ProbeBatch,
        config: SpinalConfig | None = None,
        neutral: ProbeBatch | None = None,
        lens_tokens: dict[int, int] | None = None,
    ) -> None:
        self.config = config or SpinalConfig()
        self.model = model
        self.batch = batch
        self.neutral_batch = neutral
        self.parts: ModelParts = resolve_model_parts(
            model, self.config.blocks_path, self.config.final_norm_path, self.config.head_path
        )
        self.layers = late_band(self.parts.num_blocks, self.config.late_layers)
        own = [batch] if neutral is None else [batch, neutral]
        self.stacked = ProbeBatch.stack(own)
        self._check_context_length()
        self.groups = self._groups(own)
        self.spectrum_index = self.groups[0].spectrum_index
        self.transport_index = self.groups[0].transport_index
        self._check_spectrum_rank()
        self._device_inputs: dict[torch.device, list[dict[str, Tensor]]] = {}
        self.vocab_size: int | None = None
        """The lens's vocabulary size, known after the first run (the perplexity rule's scale)."""
        self.lens_tokens: dict[int, int] = {} if lens_tokens is None else lens_tokens
        """Per probe group (0: task, 1: neutral), the lens tokens its first run settled on."""
        self.probe_fingerprint = self._probe_fingerprint()
        self.model_fingerprint = _model_fingerprint(self.parts)
        self.lens_checked = False
        """Whether the first run checked the lens against the model's logits (``lens_check``)."""
        self.lens_check_attempts = 0

    def run(self, step: int = 0) -> DepthTrace:
        """One no-grad, eval-mode forward; returns the trace (scores computed on device).

        The model's train/eval flags are restored afterwards, also when the forward raises.
        """
        started = time.perf_counter()
        device = device_of(self.parts.model)
        if not self.lens_checked:
            with self._probing(device):
                self._check_lens(device)
        with self._probing(device):
            hidden = self._capture(device)
            scores = [
                self._scores(hidden[2 * i], hidden[2 * i + 1], i) for i in range(len(self.groups))
            ]
            # The one host synchronisation of the probe.
            flat = [value.reshape(-1).float() for group in scores for value in group.values()]
            packed = torch.cat(flat).cpu()
        values = iter(packed.split([v.numel() for v in flat]))
        unpacked = [{name: next(values) for name in group} for group in scores]
        seconds = time.perf_counter() - started
        traces = [
            self._trace(step, index, fields, device, str(hidden[0].dtype), seconds)
            for index, fields in enumerate(unpacked)
        ]
        if len(traces) > 1:
            traces[0].neutral = traces[1]
        return traces[0]

    def lens_work(self) -> float | None:
        """The logit lens's multiply-adds as a multiple of a bare forward's over the probe's
        valid tokens, estimated from the model's shapes before any forward: per lens token,
        one head projection (vocabulary x width) per late block; per forward token, every
        block's and the head's weights once. The lens is counted at its fewest tokens
        (``MIN_SEQUENTIAL_TOKENS`` per group, or all of a shorter group), so the probe costs at
        least about ``1 + lens_work()`` bare forwards (a bfloat16 lens runs faster than this
        count). ``None`` when the weights are sharded (their sizes are not known here)."""
        if self.parts.entry is not self.parts.model:
            return None  # FSDP: a rank holds a shard of each weight
        head = sum(_numel(parameter) for parameter in self.parts.head.parameters())
        blocks = sum(_numel(parameter) for parameter in self.parts.blocks.parameters())
        if head == 0 or blocks == 0:
            return None
        tokens = [group.batch.num_valid_tokens for group in self.groups]
        lens_tokens = sum(min(count, MIN_SEQUENTIAL_TOKENS) for count in tokens)
        lens = lens_tokens * len(self.layers) * head
        forward = sum(tokens) * (blocks + head)
        return lens / forward

    def _trace(
        self,
        step: int,
        group_index: int,
        fields: dict[str, Tensor],
        device: torch.device,
        hidden_dtype: str,
        seconds: float,
    ) -> DepthTrace:
        group = self.groups[group_index]
        nll = fields.get("next_token_nll")
        return DepthTrace(
            step=int(step),
            layers=list(self.layers),
            num_blocks=self.parts.num_blocks,
            contraction=fields["contraction"].clone(),
            transport=fields["transport"].clone(),
            contraction_status=fields["contraction_status"].to(torch.int8),
            summary={name: float(fields[name]) for name in RAMP_SUMMARY_NAMES},
            measure=self.config.transport,
            model_fingerprint=self.model_fingerprint,
            probe_fingerprint=self.probe_fingerprint,
            lens_entropy=fields["layer_entropy"].clone(),
            next_token_nll=None if nll is None else float(nll),
            metadata={
                "probe_rows": int(group.batch.input_ids.shape[0]),
                "valid_tokens": group.batch.num_valid_tokens,
                "spectrum_tokens": int(group.spectrum_index.numel()),
                "transport_tokens": self.lens_tokens[group_index],
                "vocab_size": self.vocab_size,
                "logit_scale": self.parts.logit_scale,
                "hidden_dtype": hidden_dtype.removeprefix("torch."),
                "device": str(device),
                "seconds": seconds,
            },
        )

    @contextlib.contextmanager
    def _probing(self, device: torch.device) -> Iterator[None]:
        """The modes of a probe's forward and lens: no-grad, eval, the configured autocast, and
        a sharded root's norm and head whole (``root_parameters_whole``, entered by every rank
        alike; it reshards on exit). No-grad, not inference mode: FSDP materialises its
        gathered weights during the first forward, and weights created in inference mode break
        the training step after it."""
        autocast = autocast_context(device, self.config.autocast_dtype)
        with torch.no_grad(), root_parameters_whole(self.model), eval_mode(self.model), autocast:
            yield

    def _check_lens(self, device: torch.device) -> None:
        """Run the model on ``LENS_CHECK_TOKENS`` tokens of the longest probe row and make the
        lens of its last block give the logits the model returns: adopt the model's logit
        scale where it has one (``lens_check.measured_logit_scale``; raises where no scale
        does). Every rank of a sharded model runs it at its first probe, alike.

        Logits with a non-finite value (overflowed weights) decide nothing: the next run checks
        again, up to ``LENS_CHECK_ATTEMPTS`` runs; then, as for a model that returns no logits,
        a warning says that the lens is unverified."""
        self.lens_check_attempts += 1
        mask = self.stacked.attention_mask
        row = int(mask.sum(dim=1).argmax())
        first = int(mask[row].nonzero()[0])  # a row's tokens are contiguous
        columns = slice(first, first + LENS_CHECK_TOKENS)
        check = forward_inputs(self.parts, self.stacked, slice(row, row + 1), columns)
        inputs = {name: value.to(device) for name, value in check.items()}
        lens, logits = lens_and_model_logits(self.parts, inputs)
        if logits is None or not (torch.isfinite(lens).all() and torch.isfinite(logits).all()):
            if logits is None or self.lens_check_attempts >= LENS_CHECK_ATTEMPTS:
                self.lens_checked = True
                why = "returns no logits" if logits is None else "keeps giving non-finite logits"
                logger.warning(
                    "spinal-callback: the logit lens is unverified: the model %s, so the probe "
                    "cannot check that its final norm and head are the model's own",
                    why,
                )
            return
        scale = measured_logit_scale(self.parts, lens[0], logits[0])
        if scale is not None:
            self.parts = replace(self.parts, logit_scale=scale)
            logger.info(
                "spinal-callback: %s scales its head's logits by %.6g; the logit lens does too",
                type(self.parts.model).__name__,
                scale,
            )
        self.lens_checked = True

    def _capture(self, device: torch.device) -> list[Tensor]:
        """Forward with hooks on the late blocks; per group ``[L, n_s, d]`` and ``[L, n_t, d]``.

        One stacked forward, unless padding the groups to one length would cost more than
        ``MAX_PADDING_WASTE`` of their own tokens: then one forward per group.
        """
        captured: list[Tensor] = []
        for inputs in self._inputs_on(device):
            count = sum(1 for key in inputs if key.startswith("index"))
            rows = [inputs.pop(f"index{i}") for i in range(count)]
            captured += capture_block_outputs(self.parts, inputs, self.layers, rows)
        return captured

    def _scores(
        self, spectrum_hidden: Tensor, transport_hidden: Tensor, group_index: int
    ) -> dict[str, Tensor]:
        config = self.config
        group = self.groups[group_index]
        contraction, status = contraction_scores(
            spectrum_hidden,
            config.tail_low,
            config.tail_high,
            getattr(torch, config.spectrum_dtype),
        )
        targets = group.targets.to(transport_hidden.device)
        lens = self._lens(transport_hidden, targets, group_index)
        adjacent, entropy = lens.transport, lens.entropy
        depth = torch.tensor(self.layers, dtype=torch.float32, device=contraction.device)
        depth = depth / max(self.parts.num_blocks - 1, 1)
        summaries = ramp_summaries(contraction, adjacent, lens.end_to_end, entropy[-1], depth)
        fields = {
            "contraction": contraction,
            "transport": adjacent,
            "contraction_status": status,
            "layer_entropy": entropy,
            **{name: summaries[name] for name in RAMP_SUMMARY_NAMES},
        }
        if group.has_targets:
            fields["next_token_nll"] = lens.next_token_nll
        return fields

    def _lens(self, hidden: Tensor, targets: Tensor, group_index: int) -> LensStatistics:
        """The logit lens's statistics of ``[L, n, d]`` hidden states (``lens_statistics``).

        The first run of each group takes tokens, in their random order, until the transport is
        within ``transport_tolerance`` of the all-token value (or all of them are taken); later
        runs take the same first tokens, so that every trace of a run measures the same ones.
        """
        self.vocab_size = _vocab_size(self.parts, hidden)
        known = self.lens_tokens.get(group_index)
        if known is not None:
            hidden, targets = hidden[:, :known], targets[:known]
        statistics = lens_statistics(
            self.parts,
            hidden,
            targets,
            vocab_size=self.vocab_size,
            measure=self.config.transport,
            lens_dtype=self.config.lens_dtype,
            budget_mib=self.config.lens_chunk_mib,
            tolerance=self.config.transport_tolerance if known is None else None,
            population=self.groups[group_index].batch.num_valid_tokens,
            agree=every_rank if self.parts.zero3_partitioned else None,
        )
        self.lens_tokens[group_index] = statistics.tokens
        return statistics

    def _groups(self, batches: Sequence[ProbeBatch]) -> list[_Group]:
        """Each batch's token subsamples, chosen within the batch and mapped into the stack."""
        length = int(self.stacked.input_ids.shape[1])
        groups, offset = [], 0
        for batch in batches:
            spectrum = batch.subsample(self.config.spectrum_tokens, self.config.seed)
            transport = batch.shuffled_sample(self.config.transport_tokens, self.config.seed + 1)
            groups.append(
                _Group(
                    batch=batch,
                    spectrum_index=batch.flat_index_in(spectrum, length, offset),
                    transport_index=batch.flat_index_in(transport, length, offset),
                    targets=batch.next_tokens(transport),
                    own_spectrum_index=spectrum,
                    own_transport_index=transport,
                )
            )
            offset += int(batch.input_ids.shape[0])
        return groups

    def _separate_forwards(self) -> bool:
        """Whether the stacked batch pads more than ``MAX_PADDING_WASTE`` of the groups' own
        positions (e.g. short task prompts stacked with longer neutral texts)."""
        own = sum(g.batch.input_ids.numel() for g in self.groups)
        return self.stacked.input_ids.numel() > (1.0 + MAX_PADDING_WASTE) * own

    def _inputs_on(self, device: torch.device) -> list[dict[str, Tensor]]:
        """The forward inputs (with the token indices as ``index{k}``), one dict per forward."""
        if device not in self._device_inputs:
            if self._separate_forwards():
                forwards = []
                for group in self.groups:
                    inputs = forward_inputs(self.parts, group.batch)
                    inputs["index0"] = group.own_spectrum_index
                    inputs["index1"] = group.own_transport_index
                    forwards.append(inputs)
            else:
                inputs = forward_inputs(self.parts, self.stacked)
                for i, group in enumerate(self.groups):
                    inputs[f"index{2 * i}"] = group.spectrum_index
                    inputs[f"index{2 * i + 1}"] = group.transport_index
                forwards = [inputs]
            self._device_inputs[device] = [
                {k: v.to(device) for k, v in inputs.items()} for inputs in forwards
            ]
        return [dict(inputs) for inputs in self._device_inputs[device]]

    def _check_context_length(self) -> None:
        config = getattr(self.parts.model, "config", None)
        limit = next(
            (
                getattr(config, name)
                for name in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(getattr(config, name, None), int)
            ),
            None,
        )
        length = int(self.stacked.input_ids.shape[1])
        if limit is not None and length > limit:
            raise ValueError(
                f"the probe is {length} tokens long but the model's context is {limit}; "
                f"rebuild the ProbeBatch with max_length <= {limit} (SpinalConfig.max_probe_length)"
            )

    def _check_spectrum_rank(self) -> None:
        width = hidden_size(self.parts)
        if width is None:
            config = getattr(self.parts.model, "config", None)
            raise ValueError(
                f"cannot read the hidden size from {type(config).__name__}: give the config a "
                f"{' or '.join(HIDDEN_SIZE_NAMES)} attribute"
            )
        for name, group in zip(GROUP_NAMES, self.groups):
            rank = min(group.spectrum_index.numel() - 1, width)
            band = tail_band(rank, self.config.tail_low, self.config.tail_high)
            if len(band) < 2:
                raise ValueError(
                    f"the {name} probe's contraction fit would use {len(band)} eigenvalue(s) "
                    f"(spectrum rank {rank}, tail band {self.config.tail_low}.."
                    f"{self.config.tail_high}); it needs at least 2: use more probe tokens or "
                    "widen tail_low/tail_high"
                )

    def _probe_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for group in self.groups:
            for tensor in (
                group.batch.input_ids,
                group.batch.attention_mask,
                group.spectrum_index,
                group.transport_index,
            ):
                digest.update(tensor.numpy().tobytes())
        settings: dict[str, object] = {
            "layers": self.layers,
            "transport": self.config.transport,
            "tail": [self.config.tail_low, self.config.tail_high],
            "spectrum_dtype": self.config.spectrum_dtype,
        }
        if self.config.lens_dtype != "auto":
            # Only when set, so that traces from before the setting existed keep their print.
            settings["lens_dtype"] = self.config.lens_dtype
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()[:16]


def _vocab_size(parts: ModelParts, hidden: Tensor) -> int:
    """The number of logits the head returns, read without touching the head's weight storage:
    a DeepSpeed ZeRO-3 partitioned weight's local shape is ``[0]`` (its whole shape is
    ``ds_shape``), and reading it inside an unfinished engine forward would gather it.

    ``hidden``: ``[..., d]`` block outputs; one token of it goes through the lens when neither
    the head's attributes nor its weight's shape tell the size.
    """
    head = parts.head
    for attribute in ("out_features", "num_embeddings"):
        value = getattr(head, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    embedding = getattr(head, "embedding", None)  # the tied head of model_access
    if isinstance(embedding, nn.Embedding):
        return int(embedding.num_embeddings)
    # From the registry, not `head.weight`: ZeRO-3's attribute read can gather the parameter.
    weight = head._parameters.get("weight")
    shape = getattr(weight, "ds_shape", None)
    if shape is None and isinstance(weight, Tensor) and weight.dim() == 2:
        shape = weight.shape
    if shape is not None and int(shape[0]) > 0:
        return int(shape[0])
    return int(parts.lens_logits(hidden[:1, :1]).shape[-1])


def _model_fingerprint(parts: ModelParts) -> str:
    config = getattr(parts.model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    description = to_json(use_diff=False) if callable(to_json) else repr(config)
    digest = hashlib.sha256(type(parts.model).__name__.encode())
    digest.update(description.encode())
    digest.update(json.dumps(parts.paths, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _numel(parameter: Tensor) -> int:
    """Elements of a parameter, also one DeepSpeed ZeRO-3 partitioned (``ds_numel``)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))
