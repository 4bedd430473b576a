"""ProbeBatch (a fixed set of token ids) and SpinalProbe (one hooked forward -> DepthTrace)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback.config import SpinalConfig
from spinal_callback.metrics import (
    MIN_SPECTRUM_TOKENS,
    RAMP_SUMMARY_NAMES,
    contraction_scores,
    per_token_transport,
    ramp_summaries,
    tail_band,
    token_entropy,
)
from spinal_callback.model_access import ModelParts, resolve_model_parts
from spinal_callback.trace import DepthTrace

MIN_LATE_BAND = 4


@dataclass(frozen=True)
class ProbeBatch:
    """A frozen batch of token ids: the same probe at every step makes traces comparable.

    Attributes:
        input_ids: int64 ``[b, t]`` token ids (padding positions hold the pad id).
        attention_mask: int64 ``[b, t]``, 1 for real tokens and 0 for padding. Every statistic
            uses real tokens only, so left and right padding give the same scores.
    """

    input_ids: Tensor
    attention_mask: Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"ProbeBatch needs input_ids and attention_mask of one [batch, length] shape, got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        if self.input_ids.shape[0] == 0:
            raise ValueError("ProbeBatch is empty: give at least one probe text")
        empty_rows = (self.attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(
                f"probe row(s) {empty_rows} contain no token: remove empty texts from the probe"
            )
        if self.num_valid_tokens < MIN_SPECTRUM_TOKENS:
            raise ValueError(
                f"the probe has {self.num_valid_tokens} valid tokens; the contraction spectrum "
                f"needs at least {MIN_SPECTRUM_TOKENS}: add probe texts or use longer ones"
            )

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        texts: Sequence[str],
        max_length: int = 256,
        padding_side: str = "right",
    ) -> ProbeBatch:
        """Tokenize ``texts`` (special tokens included) and pad them into one batch.

        The tokenizer is only called, never modified; padding is done here with its pad id
        (or its eos id, or 0), on ``padding_side``, so a tokenizer without a pad token works.

        Raises:
            ValueError: no texts, a text that is not a string, or a text with no tokens.
        """
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("ProbeBatch.from_texts needs a non-empty list of strings")
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise ValueError(f"probe texts at positions {bad[:5]} are not strings")
        encoded = tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=max_length
        )
        token_ids = [list(ids) for ids in encoded["input_ids"]]
        # A text of only whitespace may still get a BOS token: count content tokens as well.
        content = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        empty = [i for i, ids in enumerate(content) if len(ids) == 0]
        if empty:
            raise ValueError(
                f"probe texts at positions {empty[:5]} tokenize to nothing: "
                f"{[texts[i] for i in empty[:3]]!r}; remove them"
            )
        return cls.from_token_ids(token_ids, _pad_id(tokenizer), padding_side)

    @classmethod
    def from_dataset(
        cls,
        tokenizer: Any,
        dataset: Any,
        column: str = "prompt",
        limit: int = 32,
        max_length: int = 256,
        padding_side: str = "right",
    ) -> ProbeBatch:
        """Take the first ``limit`` rows of ``dataset[column]`` as probe texts.

        Rows may be strings or chat messages (lists of ``{"role", "content"}`` dicts), which
        are rendered with the tokenizer's chat template when it has one. A dataset already
        tokenized by TRL (a ``<column>_ids`` column and no ``<column>``) is used as token ids.
        """
        names = getattr(dataset, "column_names", None)
        count = min(limit, len(dataset))
        if names is not None and column not in names and f"{column}_ids" in names:
            token_ids = [list(dataset[i][f"{column}_ids"])[:max_length] for i in range(count)]
            return cls.from_token_ids(token_ids, _pad_id(tokenizer), padding_side)
        if names is not None and column not in names:
            raise ValueError(
                f"the dataset has no column {column!r}; its columns are {names}. "
                "Pass column= naming the prompt column, or give probe texts directly"
            )
        rows = [dataset[i][column] for i in range(count)]
        texts = [_render_prompt(tokenizer, row) for row in rows]
        return cls.from_texts(tokenizer, texts, max_length=max_length, padding_side=padding_side)

    @classmethod
    def from_token_ids(
        cls, token_ids: Sequence[Sequence[int]], pad_token_id: int = 0, padding_side: str = "right"
    ) -> ProbeBatch:
        """Pad lists of token ids into a batch; ``padding_side`` is ``"right"`` or ``"left"``."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if len(token_ids) == 0:
            raise ValueError("ProbeBatch is empty: give at least one probe text")
        length = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), length), pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.int64)
        for row, ids in enumerate(token_ids):
            span = (
                slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            )
            input_ids[row, span] = torch.tensor(list(ids), dtype=torch.int64)
            attention_mask[row, span] = 1
        return cls(input_ids, attention_mask)

    @property
    def num_valid_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def position_ids(self) -> Tensor:
        """int64 ``[b, t]`` positions counted over real tokens (left padding shifts nothing)."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp_min(0)

    def valid_positions(self) -> Tensor:
        """int64 flat indices into ``[b * t]`` of the real tokens, row by row, in text order."""
        return self.attention_mask.reshape(-1).nonzero().flatten()

    def subsample(self, count: int, seed: int) -> Tensor:
        """Fixed flat indices of ``min(count, valid)`` real tokens, sorted.

        The choice depends only on the number of real tokens and ``seed``, so the same texts
        padded on either side pick the same tokens.
        """
        valid = self.valid_positions()
        if count >= valid.numel():
            return valid
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(valid.numel(), generator=generator)[:count].sort().values
        return valid[chosen]


def late_band(num_blocks: int, late_layers: Sequence[int] | None = None) -> list[int]:
    """Block indices to trace: ``late_layers`` normalised, or the default late band.

    The default is the last ``ceil(num_blocks / 3)`` blocks, at least 4, at most ``num_blocks``.
    """
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


class _StopForward(Exception):
    """Raised by the last hooked block: nothing after it is needed."""


def forward_inputs(parts: ModelParts, batch: ProbeBatch) -> dict[str, Tensor]:
    """Keyword inputs of a probe forward, on the CPU: int64 ``[b, t]`` ``input_ids`` and
    ``attention_mask``, and ``position_ids`` counted over real tokens (so left padding shifts
    nothing) where the model's forward accepts them."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if "position_ids" in inspect.signature(parts.model.forward).parameters:
        inputs["position_ids"] = batch.position_ids
    return inputs


def capture_block_outputs(
    parts: ModelParts,
    inputs: dict[str, Tensor],
    layers: Sequence[int],
    selections: Sequence[Tensor],
) -> list[Tensor]:
    """Run ``parts.entry(**inputs, use_cache=False)`` with forward hooks on blocks ``layers``.

    The forward stops after the deepest hooked block (nothing after it runs) and every hook is
    removed afterwards, also when the forward raises. The caller chooses grad, eval and autocast
    modes.

    Args:
        parts: the resolved model.
        inputs: ``forward_inputs`` on the model's device.
        layers: ascending block indices.
        selections: int64 flat token indices into ``[b * t]``, on the model's device.

    Returns:
        One tensor ``[len(layers), n_k, d]`` per selection, in the blocks' output dtype.

    Raises:
        RuntimeError: the forward skipped one of ``layers`` (early exit or layer dropout).
    """
    captured: dict[int, list[Tensor]] = {}
    last = max(layers)

    def hook_for(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            flat = hidden.reshape(-1, hidden.shape[-1])
            captured[layer] = [flat.index_select(0, rows) for rows in selections]
            if layer == last:
                raise _StopForward

        return hook

    handles = [parts.blocks[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        parts.entry(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in layers if i not in captured]
    if missing:
        raise RuntimeError(
            f"the forward never reached block(s) {missing}; the model skipped them "
            "(early exit or layer dropout): trace blocks that always run (late_layers)"
        )
    return [torch.stack([captured[i][k] for i in layers]) for k in range(len(selections))]


def autocast_context(
    device: torch.device, dtype_name: str | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype_name`` (``"bfloat16"``/``"float16"``) on ``device``, or a
    no-op for ``None`` (an enclosing autocast still applies)."""
    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype_name))


class SpinalProbe:
    """Runs the probe batch through a model and returns its late-layer ``DepthTrace``.

    Everything that can be wrong (unresolvable architecture, band out of range, probe longer
    than the context, too few tokens for the spectrum) raises ``ValueError`` here, at setup.

    Args:
        model: a Hugging Face causal LM, possibly wrapped in PEFT, DDP, FSDP or ``torch.compile``.
        batch: the fixed probe.
        config: score and band settings (default ``SpinalConfig()``).
    """

    def __init__(
        self, model: nn.Module, batch: ProbeBatch, config: SpinalConfig | None = None
    ) -> None:
        self.config = config or SpinalConfig()
        self.model = model
        self.batch = batch
        self.parts: ModelParts = resolve_model_parts(
            model, self.config.blocks_path, self.config.final_norm_path, self.config.head_path
        )
        self.layers = late_band(self.parts.num_blocks, self.config.late_layers)
        self._check_context_length()
        self.spectrum_index = batch.subsample(self.config.spectrum_tokens, self.config.seed)
        self.transport_index = batch.subsample(self.config.transport_tokens, self.config.seed + 1)
        self._check_spectrum_rank()
        self._device_inputs: dict[torch.device, dict[str, Tensor]] = {}
        self.probe_fingerprint = self._probe_fingerprint()
        self.model_fingerprint = _model_fingerprint(self.parts)

    def run(self, step: int = 0) -> DepthTrace:
        """One no-grad, eval-mode forward; returns the trace (scores computed on device).

        The model's train/eval flags are restored afterwards, also when the forward raises.
        """
        started = time.perf_counter()
        device = device_of(self.parts.model)
        # no_grad, not inference_mode: FSDP materialises its gathered weights during the first
        # forward, and weights created under inference_mode break the training step after it.
        autocast = autocast_context(device, self.config.autocast_dtype)
        with eval_mode(self.model), torch.no_grad(), autocast:
            spectrum_hidden, transport_hidden = self._capture(device)
            scores = self._scores(spectrum_hidden, transport_hidden)
            # The one host synchronisation of the probe.
            packed = torch.cat([s.reshape(-1).float() for s in scores]).cpu()
        count = len(self.layers)
        contraction, transport = packed[:count], packed[count : 2 * count - 1]
        status = packed[2 * count - 1 : 3 * count - 1].to(torch.int8)
        summary_values = packed[3 * count - 1 :].tolist()
        return DepthTrace(
            step=int(step),
            layers=list(self.layers),
            num_blocks=self.parts.num_blocks,
            contraction=contraction.clone(),
            transport=transport.clone(),
            contraction_status=status,
            summary=dict(zip(RAMP_SUMMARY_NAMES, summary_values)),
            measure=self.config.transport,
            model_fingerprint=self.model_fingerprint,
            probe_fingerprint=self.probe_fingerprint,
            metadata={
                "probe_rows": int(self.batch.input_ids.shape[0]),
                "valid_tokens": self.batch.num_valid_tokens,
                "spectrum_tokens": int(self.spectrum_index.numel()),
                "transport_tokens": int(self.transport_index.numel()),
                "hidden_dtype": str(spectrum_hidden.dtype).removeprefix("torch."),
                "device": str(device),
                "seconds": time.perf_counter() - started,
            },
        )

    def _capture(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Forward with hooks on the late blocks; returns ``[L, n_s, d]`` and ``[L, n_t, d]``."""
        inputs = self._inputs_on(device)
        rows = (inputs.pop("spectrum_index"), inputs.pop("transport_index"))
        spectrum, transport = capture_block_outputs(self.parts, inputs, self.layers, rows)
        return spectrum, transport

    def _scores(self, spectrum_hidden: Tensor, transport_hidden: Tensor) -> list[Tensor]:
        config = self.config
        contraction, status = contraction_scores(
            spectrum_hidden,
            config.tail_low,
            config.tail_high,
            getattr(torch, config.spectrum_dtype),
        )
        adjacent, end_to_end, entropy = self._lens_transport(transport_hidden)
        depth = torch.tensor(self.layers, dtype=torch.float32, device=contraction.device)
        depth = depth / max(self.parts.num_blocks - 1, 1)
        summaries = ramp_summaries(contraction, adjacent, end_to_end, entropy, depth)
        return [contraction, adjacent, status, *(summaries[name] for name in RAMP_SUMMARY_NAMES)]

    def _lens_transport(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logit-lens distances over ``[L, n, d]`` hidden states, a block of tokens at a time.

        Returns the mean adjacent-layer transport ``[L - 1]``, the first-to-last transport and
        the last layer's mean lens entropy, all float32 on the hidden states' device.
        """
        count, tokens = hidden.shape[0], hidden.shape[1]
        vocab = _vocab_size(self.parts, hidden)
        chunk = max(1, (self.config.lens_chunk_mib << 20) // (4 * count * vocab))
        adjacent = torch.zeros(count - 1, dtype=torch.float32, device=hidden.device)
        end_to_end = torch.zeros((), dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk):
            logits = self.parts.lens_logits(hidden[:, start : start + chunk])
            log_p = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            measure = self.config.transport
            adjacent += per_token_transport(log_p[:-1], log_p[1:], measure).sum(dim=-1)
            end_to_end += per_token_transport(log_p[0], log_p[-1], measure).sum()
            entropy += token_entropy(log_p[-1]).sum()
        return adjacent / tokens, end_to_end / tokens, entropy / tokens

    def _inputs_on(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._device_inputs:
            inputs = forward_inputs(self.parts, self.batch)
            inputs["spectrum_index"] = self.spectrum_index
            inputs["transport_index"] = self.transport_index
            self._device_inputs[device] = {k: v.to(device) for k, v in inputs.items()}
        return dict(self._device_inputs[device])

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
        length = int(self.batch.input_ids.shape[1])
        if limit is not None and length > limit:
            raise ValueError(
                f"the probe is {length} tokens long but the model's context is {limit}; "
                f"rebuild the ProbeBatch with max_length <= {limit} (SpinalConfig.max_probe_length)"
            )

    def _check_spectrum_rank(self) -> None:
        hidden_size = _hidden_size(self.parts)
        rank = min(self.spectrum_index.numel() - 1, hidden_size)
        band = tail_band(rank, self.config.tail_low, self.config.tail_high)
        if len(band) < 2:
            raise ValueError(
                f"the contraction fit would use {len(band)} eigenvalue(s) (spectrum rank {rank}, "
                f"tail band {self.config.tail_low}..{self.config.tail_high}); it needs at least 2: "
                "use more probe tokens or widen tail_low/tail_high"
            )

    def _probe_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (
            self.batch.input_ids,
            self.batch.attention_mask,
            self.spectrum_index,
            self.transport_index,
        ):
            digest.update(tensor.numpy().tobytes())
        settings = {
            "layers": self.layers,
            "transport": self.config.transport,
            "tail": [self.config.tail_low, self.config.tail_high],
            "spectrum_dtype": self.config.spectrum_dtype,
        }
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()[:16]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own train/eval flag restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _hidden_size(parts: ModelParts) -> int:
    config = getattr(parts.model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")


def _vocab_size(parts: ModelParts, hidden: Tensor) -> int:
    weight = getattr(parts.head, "weight", None)
    if isinstance(weight, Tensor):
        return int(weight.shape[0])
    return int(parts.lens_logits(hidden[:1, :1]).shape[-1])


def _model_fingerprint(parts: ModelParts) -> str:
    config = getattr(parts.model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    description = to_json(use_diff=False) if callable(to_json) else repr(config)
    digest = hashlib.sha256(type(parts.model).__name__.encode())
    digest.update(description.encode())
    digest.update(json.dumps(parts.paths, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _render_prompt(tokenizer: Any, row: Any) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, list) and all(isinstance(m, dict) and "content" in m for m in row):
        if getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(row, tokenize=False))
        return "\n".join(str(m["content"]) for m in row)
    raise ValueError(
        f"cannot read a probe prompt from {type(row).__name__} {str(row)[:80]!r}: "
        "expected a string "
        "or a list of chat messages"
    )
