"""Loading local checkpoints (``from_pretrained`` on a directory; never a hub download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

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


def checkpoint_directory(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it holds a ``config.json``; else ``FileNotFoundError``."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a local checkpoint directory (no config.json); spinal loads "
            "local checkpoints only: save one with model.save_pretrained(DIR)"
        )
    return directory
