"""Loading local checkpoints (``from_pretrained`` on a directory; never a hub download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_local_model(
    path: str | Path, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """Load a causal LM saved with ``save_pretrained`` from a local directory, in eval mode.

    Raises:
        FileNotFoundError: ``path`` is not a directory holding a ``config.json``.
        ValueError: ``dtype`` is not one of ``DTYPES``.
    """
    directory = checkpoint_directory(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    options: dict[str, Any] = {"dtype": DTYPES[dtype], "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(directory), **options)
    model.to(device)  # type: ignore[arg-type]
    return model.eval()


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
    adapted = PeftModel.from_pretrained(base, str(directory), local_files_only=True)
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
