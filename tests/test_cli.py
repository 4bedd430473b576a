"""The `spinal` command on models saved to disk (no download)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.cli import main
from spinal_callback.trace import DepthTrace


@pytest.fixture
def two_checkpoints(
    tmp_path: Path, make_model: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerFast
) -> tuple[Path, Path]:
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    model = make_model("qwen2")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    with torch.no_grad():
        for block in model.model.layers[-3:]:
            block.mlp.down_proj.weight.mul_(4.0)
    model.save_pretrained(tuned)
    return base, tuned


def test_audit_prints_side_by_side_table_and_writes_traces_and_figure(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = two_checkpoints
    out = tmp_path / "audit"
    assert main(["audit", str(base), str(tuned), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0]
    assert "base" in header and "tuned" in header
    assert (
        "contraction L07" in printed and "transport 06->07" in printed and "tortuosity" in printed
    )
    base_trace, tuned_trace = (
        DepthTrace.load(out / "traces" / "base"),
        DepthTrace.load(out / "traces" / "tuned"),
    )
    assert base_trace.probe_fingerprint == tuned_trace.probe_fingerprint
    assert not torch.allclose(base_trace.contraction, tuned_trace.contraction)
    assert (out / "depth_paths.png").read_bytes().startswith(b"\x89PNG")


def test_audit_reads_probe_texts_from_a_file(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, probe_texts: list[str]
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(probe_texts[:6]) + "\n\n")
    out = tmp_path / "audit"
    assert main(["audit", str(two_checkpoints[0]), "--texts", str(texts), "--out", str(out)]) == 0
    assert DepthTrace.load(out / "traces" / "base").metadata["probe_rows"] == 6


def test_audit_of_a_missing_directory_fails_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", str(tmp_path / "nope")]) == 2
    assert "not a local checkpoint directory" in capsys.readouterr().err


def test_audit_without_a_tokenizer_says_how_to_pass_one(
    two_checkpoints: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", str(two_checkpoints[1])]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_demo_prints_the_trace_and_writes_a_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert "contraction_slope" in capsys.readouterr().out
    assert (tmp_path / "depth_paths.png").is_file()
    assert DepthTrace.load(tmp_path / "traces" / "tiny-llama").is_finite
