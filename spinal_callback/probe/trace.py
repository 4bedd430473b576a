"""DepthTrace: one probe of one checkpoint, and its on-disk format (JSON + safetensors)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from spinal_callback.atomic import replace_atomically
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES, ContractionStatus

FORMAT_VERSION = 2
"""Version 2 added ``lens_entropy``, ``next_token_nll`` and ``neutral``; version 1 still loads."""
JSON_NAME = "trace.json"
TENSORS_NAME = "trace.safetensors"
_TENSOR_FIELDS = ("contraction", "transport", "contraction_status")
_OPTIONAL_TENSOR_FIELDS = ("lens_entropy",)
NEUTRAL_PREFIX = "neutral."


def block_name(layer: int, num_blocks: int) -> str:
    """A decoder block's name in charts: ``L07``, zero-padded to the model's widest block index
    (at least 2 digits), so that name order is depth order (TensorBoard's per-block runs, the
    heatmap's rows)."""
    width = max(2, len(str(max(num_blocks - 1, 0))))
    return f"L{layer:0{width}d}"


class DepthTraceFormatError(ValueError):
    """A saved trace is corrupted, incomplete, or from a newer format version."""


@dataclass
class DepthTrace:
    """The late-layer depth path of one checkpoint on one probe batch.

    Attributes:
        step: training step the probe ran at (0 outside training).
        layers: block indices of the late band, ascending, ``L`` of them.
        num_blocks: total decoder blocks of the model (for normalised depth).
        contraction: float32 ``[L]``, tail exponent per late layer (dimensionless).
        transport: float32 ``[L - 1]``, distance in [0, 1] between layers ``i`` and ``i + 1``.
        contraction_status: int8 ``[L]``, ``ContractionStatus`` code per layer.
        summary: ramp summaries (``RAMP_SUMMARY_NAMES``) as Python floats.
        measure: the transport measure (``"hellinger"``, ``"fisher_rao"`` or ``"js"``).
        model_fingerprint: hash of the model's class, config and resolved paths.
        probe_fingerprint: hash of the probe's token ids, mask, subsamples and score settings;
            traces are comparable only when it matches.
        metadata: free-form JSON-serialisable details (token counts, dtypes, device, timing).
        lens_entropy: float32 ``[L]``, mean entropy (nats) of each late layer's logit-lens
            distribution over the probe tokens; ``None`` in traces saved before format 2.
        next_token_nll: mean negative log-likelihood (nats per token) of each probe token's real
            next token under the deepest traced block's lens, which is the model's own output
            when the band ends at the last block (the default); ``None`` when unknown.
        neutral: the trace of the neutral-text probe taken in the same forward (text the run
            does not train on), with its own scores; ``None`` when there was none.
    """

    step: int
    layers: list[int]
    num_blocks: int
    contraction: Tensor
    transport: Tensor
    contraction_status: Tensor
    summary: dict[str, float]
    measure: str
    model_fingerprint: str
    probe_fingerprint: str
    metadata: dict[str, Any] = field(default_factory=dict)
    lens_entropy: Tensor | None = None
    next_token_nll: float | None = None
    neutral: DepthTrace | None = None

    def __post_init__(self) -> None:
        count = len(self.layers)
        expected = {
            "contraction": (count,),
            "transport": (count - 1,),
            "contraction_status": (count,),
            "lens_entropy": (count,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"DepthTrace.{name} has shape {tuple(getattr(self, name).shape)}, expected "
                    f"{shape} for {count} late layers"
                )

    @property
    def depth(self) -> Tensor:
        """float32 ``[L]`` normalised depth ``index / (num_blocks - 1)`` of each late layer."""
        return torch.tensor(self.layers, dtype=torch.float32) / max(self.num_blocks - 1, 1)

    @property
    def notes(self) -> list[str]:
        """Human-readable caveats: layers whose contraction was not an ordinary fit."""
        messages = []
        for layer, code in zip(self.layers, self.contraction_status.tolist()):
            if code == ContractionStatus.RANK_DEFICIENT:
                messages.append(
                    f"layer {layer}: activations are rank-deficient; contraction was fitted over "
                    "the eigenvalues above the numerical floor only"
                )
            elif code == ContractionStatus.DEGENERATE:
                messages.append(
                    f"layer {layer}: activations are constant or rank one; contraction set to 0"
                )
        return messages

    @property
    def is_finite(self) -> bool:
        """True when every score and summary, the neutral trace's included, is finite."""
        tensors = [self.contraction, self.transport]
        if self.lens_entropy is not None:
            tensors.append(self.lens_entropy)
        scalars = [*self.summary.values()]
        if self.next_token_nll is not None:
            scalars.append(self.next_token_nll)
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        finite = finite and all(math.isfinite(v) for v in scalars)
        return finite and (self.neutral is None or self.neutral.is_finite)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types (lists of floats for the tensors)."""
        return {
            **self._header(),
            "contraction": self.contraction.tolist(),
            "transport": self.transport.tolist(),
            "contraction_status": self.contraction_status.tolist(),
            "lens_entropy": None if self.lens_entropy is None else self.lens_entropy.tolist(),
            "neutral": None if self.neutral is None else self.neutral.to_dict(),
        }

    def _header(self) -> dict[str, Any]:
        """The JSON fields that are not tensors (the neutral trace excluded)."""
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "layers": list(self.layers),
            "num_blocks": self.num_blocks,
            "summary": dict(self.summary),
            "next_token_nll": self.next_token_nll,
            "measure": self.measure,
            "model_fingerprint": self.model_fingerprint,
            "probe_fingerprint": self.probe_fingerprint,
            "metadata": dict(self.metadata),
            "notes": self.notes,
        }

    def save(self, path: str | Path) -> Path:
        """Write the trace to directory ``path`` as ``trace.json`` + ``trace.safetensors``.

        Returns the directory. Existing files of a previous trace there are replaced.
        """
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        header = self._header()
        if self.neutral is not None:
            tensors.update({NEUTRAL_PREFIX + k: v for k, v in self.neutral._tensors().items()})
            header["neutral"] = self.neutral._header()
        tensor_path = replace_atomically(
            directory / TENSORS_NAME, lambda partial: save_file(tensors, str(partial))
        )
        header["tensors_sha256"] = _sha256(tensor_path)
        text = json.dumps(header, indent=2, sort_keys=True)
        replace_atomically(directory / JSON_NAME, lambda partial: partial.write_text(text))
        return directory

    @classmethod
    def load(cls, path: str | Path) -> DepthTrace:
        """Read a trace written by ``save``.

        Raises:
            FileNotFoundError: ``path`` holds no trace.
            DepthTraceFormatError: the files are corrupted, incomplete, or from a newer version.
        """
        directory = Path(path)
        json_path, tensor_path = directory / JSON_NAME, directory / TENSORS_NAME
        for required in (json_path, tensor_path):
            if not required.is_file():
                raise FileNotFoundError(f"no DepthTrace at {directory}: {required.name} is missing")
        header = _read_header(json_path)
        if _sha256(tensor_path) != header.get("tensors_sha256"):
            raise DepthTraceFormatError(
                f"{tensor_path} does not match the checksum recorded in {json_path}: the trace is "
                "corrupted or its two files come from different saves; re-run the probe"
            )
        try:
            tensors = load_file(str(tensor_path))
        except SafetensorError as error:
            # The checksum matched, so the file was saved this way (or edited and re-hashed):
            # reading it again will not help, probing again will.
            raise DepthTraceFormatError(
                f"{tensor_path} is not a readable safetensors file ({error}) although it matches "
                f"the checksum in {json_path}; delete {directory} and re-run the probe"
            ) from error
        try:
            neutral_header = header.get("neutral")
            neutral = None
            if neutral_header is not None:
                prefixed = {
                    k.removeprefix(NEUTRAL_PREFIX): v
                    for k, v in tensors.items()
                    if k.startswith(NEUTRAL_PREFIX)
                }
                neutral = cls._from_header(neutral_header, prefixed)
            return cls._from_header(header, tensors, neutral)
        except (KeyError, TypeError, ValueError) as error:
            raise DepthTraceFormatError(
                f"{directory} is not a complete DepthTrace ({type(error).__name__}: {error})"
            ) from error

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DepthTrace:
        """Inverse of ``to_dict`` (used for callback state in checkpoints)."""
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise DepthTraceFormatError(
                f"trace format {data['format_version']} is newer than the {FORMAT_VERSION} this "
                "spinal-callback reads; upgrade spinal-callback"
            )
        tensors = {
            "contraction": torch.tensor(data["contraction"], dtype=torch.float32),
            "transport": torch.tensor(data["transport"], dtype=torch.float32),
            "contraction_status": torch.tensor(data["contraction_status"], dtype=torch.int8),
        }
        if data.get("lens_entropy") is not None:
            tensors["lens_entropy"] = torch.tensor(data["lens_entropy"], dtype=torch.float32)
        neutral = data.get("neutral")
        return cls._from_header(data, tensors, None if neutral is None else cls.from_dict(neutral))

    def _tensors(self) -> dict[str, Tensor]:
        names = [*_TENSOR_FIELDS, *_OPTIONAL_TENSOR_FIELDS]
        return {
            name: getattr(self, name).detach().cpu().contiguous()
            for name in names
            if getattr(self, name) is not None
        }

    @classmethod
    def _from_header(
        cls,
        header: dict[str, Any],
        tensors: dict[str, Tensor],
        neutral: DepthTrace | None = None,
    ) -> DepthTrace:
        nll = header.get("next_token_nll")
        return cls(
            step=int(header["step"]),
            layers=[int(i) for i in header["layers"]],
            num_blocks=int(header["num_blocks"]),
            summary={name: float(header["summary"][name]) for name in RAMP_SUMMARY_NAMES},
            measure=str(header["measure"]),
            model_fingerprint=str(header["model_fingerprint"]),
            probe_fingerprint=str(header["probe_fingerprint"]),
            metadata=dict(header.get("metadata", {})),
            lens_entropy=tensors.get("lens_entropy"),
            next_token_nll=None if nll is None else float(nll),
            neutral=neutral,
            **{name: tensors[name] for name in _TENSOR_FIELDS},
        )


def _read_header(json_path: Path) -> dict[str, Any]:
    try:
        header = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DepthTraceFormatError(f"{json_path} is not valid JSON: {error}") from error
    if not isinstance(header, dict) or not isinstance(header.get("format_version"), int):
        raise DepthTraceFormatError(
            f"{json_path} has no integer 'format_version'; not a DepthTrace"
        )
    if header["format_version"] > FORMAT_VERSION:
        raise DepthTraceFormatError(
            f"{json_path} was written in trace format {header['format_version']}, newer than the "
            f"{FORMAT_VERSION} this spinal-callback reads; upgrade spinal-callback to load it"
        )
    return header


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
