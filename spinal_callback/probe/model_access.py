"""Find the decoder blocks, final norm and unembedding of a Hugging Face causal LM.

Works through the wrappers training code puts around a model: PEFT (``PeftModel``), DDP /
``DataParallel`` / DeepSpeed (``.module``), ``torch.compile`` (``._orig_mod``) and FSDP
(``._fsdp_wrapped_module``).
Architectures the lookup does not know can be pointed at by attribute path
(``SpinalConfig(blocks_path=..., final_norm_path=..., head_path=...)``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.layers",
    "transformer.blocks",
    "model.language_model.layers",
)
FINAL_NORM_PATHS = (
    "model.norm",
    "model.decoder.final_layer_norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.final_layernorm",
    "transformer.norm_f",
    "model.language_model.norm",
    "model.embedding_norm",  # LFM2: despite its name, applied after the last block
)
HEAD_INPUT_PATHS = ("model.decoder.project_out",)
HIDDEN_SIZE_NAMES = ("hidden_size", "n_embd", "d_model")
"""Config attributes that name the residual-stream width, in the order ``hidden_size`` reads
them (Llama-style, GPT-2, T5-style)."""


class ModelAccessError(ValueError):
    """The model's blocks, final norm or unembedding could not be found."""


@dataclass(frozen=True)
class ModelParts:
    """The pieces of a causal LM the probe needs, resolved once at setup.

    Attributes:
        model: the unwrapped ``*ForCausalLM`` module the probe calls.
        blocks: the decoder blocks, in depth order.
        final_norm: the norm applied to the last block's output before the unembedding.
        head: the unembedding (``hidden -> logits``).
        head_input: a projection between the final norm and the head (OPT's ``project_out``).
        logit_softcap: ``cap`` for models whose logits are ``cap * tanh(logits / cap)`` (Gemma 2).
        logit_scale: ``s`` for models that multiply the head's output by a constant before any
            soft cap (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, a hidden-state
            multiplier ahead of the head). ``None`` at resolution; the probe measures it once
            (``SpinalProbe`` checks that the lens of the last block gives the model's logits).
        paths: the attribute paths found, for messages and fingerprints.
        entry: the module whose forward the probe calls: ``model``, or the outermost FSDP (v1)
            wrapper, whose forward gathers the sharded parameters. Other wrappers are skipped
            so that no DDP collective runs during a probe.
        outer: the outermost module below the DDP, DeepSpeed and ``torch.compile`` wrappers
            (a PEFT model, else ``model``): the module a DeepSpeed engine hooks its forward
            prologue and epilogue onto, which the probe calls under ZeRO-3 (``forward_entry``).
    """

    model: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module
    head: nn.Module
    head_input: nn.Module | None
    logit_softcap: float | None
    paths: dict[str, str]
    entry: nn.Module
    outer: nn.Module | None = None
    logit_scale: float | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def zero3_partitioned(self) -> bool:
        """Whether DeepSpeed ZeRO-3 partitions the model's parameters (they carry a ``ds_id``).

        Read at each call, not at setup: Lightning's strategy partitions the model after the
        callbacks' ``setup``. Reads no parameter's storage.
        """
        return any(hasattr(parameter, "ds_id") for parameter in self.model.parameters())

    def forward_entry(self) -> nn.Module:
        """The module whose forward the probe calls: under ZeRO-3 the module the engine wraps
        (``outer``), whose hooks start and end the engine's forward; else ``entry``."""
        if self.outer is not None and self.zero3_partitioned:
            return self.outer
        return self.entry

    def lens_logits(self, hidden: Tensor, head_weight: Tensor | None = None) -> Tensor:
        """Logit lens: ``[..., d]`` block outputs to ``[..., V]`` logits, in the head's dtype.

        ``head_weight``: a copy of the head's ``[V, d]`` weight (``head_weight_as``) to multiply
        with instead of calling the head; the logits are then in its dtype.
        """
        projected = self.lens_inputs(hidden)
        if head_weight is None:
            return self.finished(self.head(projected))
        return self.head_logits(projected, head_weight)

    def lens_inputs(self, hidden: Tensor) -> Tensor:
        """``[..., d]`` block outputs through the final norm (and OPT's ``project_out``): what
        the head multiplies."""
        projected = self.final_norm(hidden)
        if self.head_input is not None:
            projected = self.head_input(projected)
        return projected

    def head_logits(
        self, projected: Tensor, head_weight: Tensor, columns: slice = slice(None)
    ) -> Tensor:
        """The logits of vocabulary ``columns`` (all by default) for ``lens_inputs`` output
        ``projected`` ``[..., d]``, from the head's ``[V, d]`` weight (``head_weight_as``):
        ``[..., C]`` in the weight's dtype (or an enclosing autocast's), scaled and soft-capped
        like the model's (``finished``)."""
        bias = getattr(self.head, "bias", None)
        weight = head_weight[columns]
        bias = None if bias is None else bias[columns].to(weight.dtype)
        return self.finished(nn.functional.linear(projected.to(weight.dtype), weight, bias))

    def finished(self, logits: Tensor) -> Tensor:
        """The head's output as the model returns its logits: times ``logit_scale``, then
        ``cap * tanh(logits / cap)`` for a soft-capping model (Gemma 2); else ``logits``."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap

    def head_weight_as(self, dtype: torch.dtype | None, device: torch.device) -> Tensor | None:
        """The head's ``[V, d]`` weight cast to ``dtype`` (``None``: as it is, detached), when the
        head is a plain ``nn.Linear`` whose whole weight is materialised on ``device``; else
        ``None`` (a sharded, offloaded, ZeRO-3 partitioned or unusual head is called as a module,
        so its engine's hooks gather and release it)."""
        head = self.head
        if type(head) is not nn.Linear or self.zero3_partitioned:
            return None
        weight = head.weight
        if type(weight) not in (nn.Parameter, Tensor) or weight.device != device:
            return None
        if tuple(weight.shape) != (head.out_features, head.in_features):
            return None
        return weight.detach() if dtype is None else weight.detach().to(dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP, FSDP, DeepSpeed, ``torch.compile`` and PEFT wrappers; return the LM inside.

    A compiled model is unwrapped to its eager module: forward hooks on a compiled graph are not
    reliable, and the probe runs outside the training step anyway.
    """
    return wrapper_chain(model)[-1]


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model`` and every module it wraps, outermost first, ending with the LM itself."""
    chain = [model]
    while (inner := _wrapped_module(chain[-1])) is not None and len(chain) < 16:
        chain.append(inner)
    return chain


def peft_model_in(model: nn.Module) -> nn.Module | None:
    """The PEFT model among ``model``'s wrappers, if any (it can switch its adapters off)."""
    return next((m for m in wrapper_chain(model) if type(m).__name__.startswith("Peft")), None)


def _is_engine_wrapper(module: nn.Module) -> bool:
    """DDP, ``DataParallel``, a DeepSpeed engine or a ``torch.compile`` wrapper: modules whose
    forward adds collectives or compilation around the model's own."""
    name = type(module).__name__
    return name.endswith("DataParallel") or name in ("DeepSpeedEngine", "OptimizedModule")


def _wrapped_module(model: nn.Module) -> nn.Module | None:
    name = type(model).__name__
    get_base_model = getattr(model, "get_base_model", None)
    if name.startswith("Peft") and callable(get_base_model):
        base = get_base_model()
        return base if isinstance(base, nn.Module) else None
    for attribute in ("_orig_mod", "_fsdp_wrapped_module"):
        inner = model.__dict__.get("_modules", {}).get(attribute)
        if isinstance(inner, nn.Module):
            return inner
    if name.endswith("DataParallel") or name == "DeepSpeedEngine":
        inner = getattr(model, "module", None)
        return inner if isinstance(inner, nn.Module) else None
    return None


def resolve_model_parts(
    model: nn.Module,
    blocks_path: str | None = None,
    final_norm_path: str | None = None,
    head_path: str | None = None,
) -> ModelParts:
    """Find blocks, final norm and unembedding of ``model`` (wrappers are looked through).

    Explicit paths are attribute paths relative to the unwrapped model, e.g. ``"model.layers"``.

    Raises:
        ModelAccessError: naming what was found and the ``SpinalConfig`` field that fixes it.
    """
    chain = wrapper_chain(model)
    inner = chain[-1]
    blocks, found_blocks = _resolve_blocks(inner, blocks_path)
    final_norm, found_norm = _resolve_final_norm(inner, final_norm_path)
    head, found_head = _resolve_head(inner, head_path)
    head_input = next(
        (m for m in (_get_path(inner, p) for p in HEAD_INPUT_PATHS) if isinstance(m, nn.Module)),
        None,
    )
    config = getattr(inner, "config", None)
    softcap = next(
        (
            getattr(c, "final_logit_softcapping", None)
            for c in (config, _text_config(config))
            if getattr(c, "final_logit_softcapping", None)
        ),
        None,
    )
    return ModelParts(
        model=inner,
        blocks=blocks,
        final_norm=final_norm,
        head=head,
        head_input=head_input,
        logit_softcap=float(softcap) if softcap else None,
        paths={"blocks": found_blocks, "final_norm": found_norm, "head": found_head},
        entry=next((m for m in chain if type(m).__name__ == "FullyShardedDataParallel"), inner),
        outer=next(m for m in chain if not _is_engine_wrapper(m)),
    )


_REFERENCE_ADVICE = (
    "The reference must be the policy's starting point (the same architecture and size), e.g. "
    "the model the policy was loaded from: pass that model as the reference (TRL's ref_model)."
)


def check_reference_model(
    policy: nn.Module,
    reference: object,
    *,
    blocks_path: str | None = None,
    final_norm_path: str | None = None,
    head_path: str | None = None,
) -> None:
    """Check at setup that ``reference`` can be ``policy``'s baseline: a module of the same
    architecture, number of decoder blocks, hidden size and vocabulary size. Wrappers (PEFT,
    DDP, FSDP, ...) are looked through on both sides, so a LoRA policy passes with its base.

    The paths are ``resolve_model_parts``'s and apply to both models. Call it only when a
    reference is given: ``None`` is not a module. A size one model does not expose is not
    compared.

    Raises:
        TypeError: ``reference`` is not an ``nn.Module`` (a path: load the model first).
        ValueError: the architecture (``config.model_type``; without one, the decoder blocks'
            class), number of decoder blocks, hidden size or vocabulary size (the unembedding's
            output width, else ``config.vocab_size``) differ, or the reference's parts are not
            where the policy's are.
        ModelAccessError: the policy's own parts cannot be found (as ``resolve_model_parts``).

    Example:
        >>> from spinal_callback.demos.tiny import build_tiny_model
        >>> check_reference_model(build_tiny_model(layers=4), build_tiny_model(layers=4))
        >>> check_reference_model(  # doctest: +ELLIPSIS
        ...     build_tiny_model(layers=4), build_tiny_model(layers=2)
        ... )
        Traceback (most recent call last):
        ...
        ValueError: the reference model's number of decoder blocks is 2 but the policy's is 4. ...
    """
    if not isinstance(reference, nn.Module):
        raise TypeError(_not_a_module(reference))
    paths = {"blocks_path": blocks_path, "final_norm_path": final_norm_path, "head_path": head_path}
    policy_parts = resolve_model_parts(policy, **paths)
    policy_type, reference_type = _model_type(policy_parts.model), _model_type(reference)
    if policy_type and reference_type:
        _check_same("architecture", policy_type, reference_type)
    try:
        reference_parts = resolve_model_parts(reference, **paths)
    except ModelAccessError as error:
        raise ValueError(
            f"found no decoder blocks, final norm or unembedding in the reference model "
            f"({type(unwrap_model(reference)).__name__}) where the policy "
            f"({type(policy_parts.model).__name__}) has them, {policy_parts.paths}: {error} "
            f"{_REFERENCE_ADVICE}"
        ) from error
    if not (policy_type and reference_type):
        _check_same(
            "decoder block class", _block_class(policy_parts), _block_class(reference_parts)
        )
    _check_same("number of decoder blocks", policy_parts.num_blocks, reference_parts.num_blocks)
    _check_same("hidden size", hidden_size(policy_parts), hidden_size(reference_parts))
    _check_same("vocabulary size", _vocab_size(policy_parts), _vocab_size(reference_parts))


def _not_a_module(reference: object) -> str:
    if not isinstance(reference, (str, os.PathLike)):
        return (
            "the reference model must be an nn.Module, got an object of type "
            f"{type(reference).__name__}. Pass the model the policy was loaded from."
        )
    path = os.fspath(reference)
    return (
        f"the reference model must be an nn.Module, got the path {path!r}. Load it first and "
        f"pass the model, e.g. AutoModelForCausalLM.from_pretrained({path!r}) or "
        f"spinal_callback.probe.loading.load_local_model({path!r})."
    )


def _check_same(what: str, policy_value: object, reference_value: object) -> None:
    if policy_value is not None and reference_value is not None and policy_value != reference_value:
        raise ValueError(
            f"the reference model's {what} is {reference_value} but the policy's is "
            f"{policy_value}. {_REFERENCE_ADVICE}"
        )


def _model_type(model: nn.Module) -> str | None:
    """``config.model_type`` and the LM's class, e.g. ``"'llama' (LlamaForCausalLM)"``."""
    inner = unwrap_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        return None
    return f"{model_type!r} ({type(inner).__name__})"


def _block_class(parts: ModelParts) -> str:
    """The first decoder block's own class, below per-block wrappers: ``torch.compile`` and
    FSDP (v1), activation checkpointing, and the subclass ``fully_shard`` makes on the fly."""
    block = wrapper_chain(parts.blocks[0])[-1]
    block = getattr(block, "_checkpoint_wrapped_module", block)
    return next(
        c.__name__ for c in type(block).__mro__ if not c.__module__.startswith("torch.distributed")
    )


def _head_shape(parts: ModelParts) -> tuple[int | None, int | None]:
    """The unembedding's ``(V, d_in)``, when it is a linear layer or tied embeddings."""
    head = parts.head
    if isinstance(head, nn.Linear):
        return head.out_features, head.in_features
    if isinstance(head, _TiedHead):
        return head.embedding.num_embeddings, head.embedding.embedding_dim
    return None, None


def hidden_size(parts: ModelParts) -> int | None:
    """The width ``d`` of the residual stream (the blocks' outputs), or ``None`` when nothing
    tells it.

    Read from the model's config (its text part for a multimodal model) as ``hidden_size``,
    ``n_embd`` or ``d_model``, the first that is an ``int``; without one, from the head's input
    width when the head takes the final norm's output directly (no OPT ``project_out``).
    """
    config = _text_config(getattr(parts.model, "config", None))
    for name in HIDDEN_SIZE_NAMES:
        size = getattr(config, name, None)
        if isinstance(size, int):
            return size
    return _head_shape(parts)[1] if parts.head_input is None else None


def _vocab_size(parts: ModelParts) -> int | None:
    width = _head_shape(parts)[0]
    if width is not None:
        return width
    size = getattr(_text_config(getattr(parts.model, "config", None)), "vocab_size", None)
    return size if isinstance(size, int) else None


def _text_config(config: object) -> object:
    """A multimodal config's language-model part (where its soft cap lives), else ``config``."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _get_path(root: nn.Module, path: str) -> object | None:
    try:
        return functools.reduce(getattr, path.split("."), root)
    except AttributeError:
        return None


def _resolve_blocks(model: nn.Module, path: str | None) -> tuple[nn.ModuleList, str]:
    candidates = (path,) if path else BLOCK_PATHS
    for candidate in candidates:
        found = _get_path(model, candidate)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found, candidate
    module_lists = [
        f"{name} ({len(module)} x {type(module[0]).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if path:
        problem = f"blocks_path={path!r} is not a non-empty nn.ModuleList on {type(model).__name__}"
    else:
        problem = f"found no decoder blocks in {type(model).__name__} under {list(BLOCK_PATHS)}"
    raise ModelAccessError(
        f"{problem}. ModuleLists in the model: {module_lists or 'none'}. "
        "Pass SpinalConfig(blocks_path='<path.to.blocks>') naming the decoder blocks."
    )


def _resolve_final_norm(model: nn.Module, path: str | None) -> tuple[nn.Module, str]:
    candidates = (path,) if path else FINAL_NORM_PATHS
    for candidate in candidates:
        found = _get_path(model, candidate)
        if isinstance(found, nn.Module):
            return found, candidate
    norms = [
        name
        for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower() and name.count(".") <= 2
    ]
    if path:
        problem = f"final_norm_path={path!r} is not a module of {type(model).__name__}"
    else:
        problem = f"found no final norm in {type(model).__name__} under {list(FINAL_NORM_PATHS)}"
    raise ModelAccessError(
        f"{problem}. Shallow norm modules in the model: {norms or 'none'}. "
        "Pass SpinalConfig(final_norm_path='<path.to.norm>') naming the norm applied before "
        "the unembedding."
    )


def _resolve_head(model: nn.Module, path: str | None) -> tuple[nn.Module, str]:
    if path:
        found = _get_path(model, path)
        if isinstance(found, nn.Module):
            return found, path
        raise ModelAccessError(
            f"head_path={path!r} is not a module of {type(model).__name__}. "
            "Pass SpinalConfig(head_path='<path.to.lm_head>') naming the unembedding."
        )
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if isinstance(head, nn.Module):
        name = next((n for n, m in model.named_modules() if m is head), "get_output_embeddings()")
        return head, name
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    config = getattr(model, "config", None)
    if callable(get_input_embeddings) and getattr(config, "tie_word_embeddings", False):
        embedding = get_input_embeddings()
        if isinstance(embedding, nn.Embedding):
            return _TiedHead(embedding), "tied input embeddings"
    raise ModelAccessError(
        f"found no unembedding in {type(model).__name__}: get_output_embeddings() returned "
        f"{head!r} and the word embeddings are not tied. Pass "
        "SpinalConfig(head_path='<path.to.lm_head>') naming the module that maps hidden "
        "states to logits."
    )


class _TiedHead(nn.Module):
    """Unembedding through the input embedding matrix, for tied models without an output module."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: Tensor) -> Tensor:
        return nn.functional.linear(hidden, self.embedding.weight)
