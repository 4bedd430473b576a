"""Loading local checkpoints (``from_pretrained`` on a directory; never a hub download)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# What ``from_pretrained`` raises for a checkpoint that is missing, damaged or inconsistent on
# disk: no weight file (OSError), an unknown model type (ValueError), a torn safetensors header
# (SafetensorError), a torn zip or shapes that disagree with config.json (RuntimeError), a torn
# pickle (UnpicklingError, EOFError).
_CHECKPOINT_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    SafetensorError,
    pickle.UnpicklingError,
    EOFError,
)


class CheckpointLoadError(OSError):
    """A local checkpoint directory exists but its contents cannot be loaded as a model.

    A subclass of ``OSError`` because that is what ``from_pretrained`` raises for missing weight
    files, so ``except OSError`` in callers keeps working.
    """


def load_local_model(
    path: str | Path, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """Load a causal LM saved with ``save_pretrained`` from a local directory, in eval mode.

    The device is checked before any weight is read (see ``check_device``).

    Raises:
        FileNotFoundError: ``path`` is not a directory holding a ``config.json``.
        ValueError: ``dtype`` is not one of ``DTYPES``, or ``device`` is not usable here.
        CheckpointLoadError: the weights are missing, truncated or corrupted, or do not match
            ``config.json``.
    """
    directory = checkpoint_directory(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target = check_device(device)
    options: dict[str, Any] = {"dtype": DTYPES[dtype], "local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **options)
    except _CHECKPOINT_ERRORS as error:
        raise CheckpointLoadError(
            _checkpoint_problem(directory, error, "config.json", WEIGHT_FILES)
        ) from error
    model.to(target)  # type: ignore[arg-type]
    return model.eval()


def check_device(device: str, option: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` after checking that this machine has it.

    Args:
        device: a torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``.
        option: how the caller's user spells the setting (``"--device"`` on the command line),
            so the error tells them exactly what to type instead.

    Raises:
        ValueError: ``device`` is not a torch device string, or names an accelerator (or an
            accelerator index) this machine does not have.
    """
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"{option}={device} is not a torch device; use {option}=cpu, {option}=cuda or "
            f"{option}=cuda:N"
        ) from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{option}={device} but torch.cuda.is_available() is False; use {option}=cpu"
            )
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            raise ValueError(
                f"{option}={device} but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); use one of those"
            )
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"{option}={device} but torch.backends.mps.is_available() is False; use {option}=cpu"
        )
    return target


def _checkpoint_problem(
    directory: Path, error: BaseException, config_name: str, weight_files: tuple[str, ...]
) -> str:
    """One line: which checkpoint, what ``from_pretrained`` said, and what to do about it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if not any((directory / name).is_file() for name in weight_files):
        return (
            f"{directory} has a {config_name} but no weights (none of {list(weight_files)}); "
            "save the model there with model.save_pretrained(DIR)"
        )
    return (
        f"cannot load the checkpoint in {directory} ({cause}); its files may be truncated or "
        "corrupted, disagree with its config.json, or need a newer transformers: copy or save it "
        "again with model.save_pretrained(DIR)"
    )


def load_local_tokenizer(path: str | Path) -> Any:
    """Load the tokenizer saved next to a checkpoint; a clear error when there is none."""
    directory = Path(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {directory} (none of {list(TOKENIZER_FILES)}); save one there with "
            "tokenizer.save_pretrained(DIR) or pass --tokenizer PATH"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"no tokenizer could be loaded from {directory} ({error}); save one there with "
            "tokenizer.save_pretrained(...) or pass --tokenizer PATH"
        ) from error


def load_local_adapted_model(
    adapter_path: str | Path, base_path: str | Path, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """The base checkpoint at ``base_path`` with the PEFT adapter saved at ``adapter_path``
    (``save_pretrained`` of a ``PeftModel``: ``adapter_config.json`` + weights) merged in.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` in ``adapter_path``.
        ImportError: peft is not installed (``pip install 'spinal-callback[peft]'``).
        CheckpointLoadError: the base or the adapter weights cannot be loaded.
    """
    directory = Path(adapter_path)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds no {ADAPTER_CONFIG}; it is not a PEFT adapter")
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError(
            f"{directory} is a PEFT adapter; loading it needs peft: "
            "pip install 'spinal-callback[peft]'"
        ) from error
    base = load_local_model(base_path, dtype=dtype, device=device)
    try:
        adapted = PeftModel.from_pretrained(base, str(directory), local_files_only=True)
    except _CHECKPOINT_ERRORS as error:
        raise CheckpointLoadError(
            _checkpoint_problem(directory, error, ADAPTER_CONFIG, ADAPTER_WEIGHT_FILES)
        ) from error
    return adapted.merge_and_unload().eval()


def is_adapter_directory(path: str | Path) -> bool:
    """``path`` holds a PEFT adapter and no full checkpoint."""
    directory = Path(path)
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file()


def checkpoint_directory(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it holds a ``config.json``; else ``FileNotFoundError``."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a local checkpoint directory (no config.json); spinal loads "
            "local checkpoints only: save one with model.save_pretrained(DIR)"
        )
    return directory
