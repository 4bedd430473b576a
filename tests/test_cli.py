"""The `spinal` command on models saved to disk (no download)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.probe.trace import DepthTrace
from spinal_callback.tools.cli import main


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


def the_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `spinal` printed about the failure (libraries may log other lines)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("spinal ")]
    assert len(lines) == 1, err
    return lines[0]


def damaged_copy(checkpoint: Path, destination: Path, damage: Callable[[Path], None]) -> Path:
    """A copy of ``checkpoint`` (weights, config and tokenizer) with ``damage`` applied to it."""
    shutil.copytree(checkpoint, destination)
    damage(destination)
    return destination


def remove_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()


def truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def garble_weights_header(directory: Path) -> None:
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{not json" + data[17:])


def widen_config(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] *= 2
    (directory / "config.json").write_text(json.dumps(config))


def unknown_model_type(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (directory / "config.json").write_text(json.dumps(config))


def garble_config(directory: Path) -> None:
    (directory / "config.json").write_text("{not json")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (remove_weights, "has a config.json but no weights"),
        (truncate_weights, "SafetensorError"),
        (garble_weights_header, "SafetensorError"),
        (widen_config, "RuntimeError"),
        (unknown_model_type, "no-such-architecture"),
        (garble_config, "not a valid JSON file"),
    ],
)
def test_audit_of_a_damaged_checkpoint_is_one_line_and_exit_two(
    two_checkpoints: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    expected: str,
) -> None:
    base = two_checkpoints[0]
    damaged = damaged_copy(base, tmp_path / "damaged", damage)
    command = ["audit", str(damaged), "--tokenizer", str(base), "--out", str(tmp_path / "audit")]
    assert main(command) == 2
    line = the_error_line(capsys)
    assert line.startswith("spinal audit: error: ") and str(damaged) in line
    assert expected in line and "model.save_pretrained(DIR)" in line


def test_audit_on_cuda_without_cuda_says_to_use_the_cpu_before_loading(
    two_checkpoints: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "audit"
    assert main(["audit", str(two_checkpoints[0]), "--device", "cuda", "--out", str(out)]) == 2
    assert the_error_line(capsys) == (
        "spinal audit: error: --device=cuda but torch.cuda.is_available() is False; "
        "use --device=cpu"
    )
    assert not out.exists()


def test_audit_on_a_cuda_index_this_machine_lacks_names_the_devices_it_has(
    two_checkpoints: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["audit", str(two_checkpoints[0]), "--device", "cuda:2"]) == 2
    assert "has 2 CUDA device(s) (cuda:0 to cuda:1)" in the_error_line(capsys)


def test_audit_on_a_device_string_torch_does_not_know_lists_valid_ones(
    two_checkpoints: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", str(two_checkpoints[0]), "--device", "floppy"]) == 2
    assert the_error_line(capsys) == (
        "spinal audit: error: --device=floppy is not a torch device; use --device=cpu, "
        "--device=cuda or --device=cuda:N"
    )


@pytest.mark.parametrize("option", ["--device", "--tuned-device"])
def test_localize_checks_both_devices_before_reading_anything(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    option: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = str(tmp_path / "missing")
    command = ["localize", "--base", missing, "--tuned", missing, "--pairs", missing]
    assert main([*command, option, "cuda"]) == 2
    assert the_error_line(capsys).startswith(f"spinal localize: error: {option}=cuda but")


def test_the_console_script_reports_truncated_weights_in_one_line_without_traceback(
    two_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    damaged = damaged_copy(two_checkpoints[0], tmp_path / "damaged", truncate_weights)
    environment = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "spinal_callback.tools.cli", "audit", str(damaged)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 2
    logged = [line for line in completed.stderr.splitlines() if not line.startswith("probing ")]
    assert len(logged) == 1, completed.stderr
    assert logged[0].startswith(f"spinal audit: error: cannot load the checkpoint in {damaged}")


LOCALIZE = ["localize", "--base", "base", "--tuned", "tuned", "--pairs", "pairs.jsonl"]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["audit", "ckpt", "--max-length", "-5"],
            "--max-length: got '-5', expected an integer >= 8",
        ),
        (["audit", "ckpt", "--max-length", "2"], "--max-length: got '2', expected an integer >= 8"),
        (
            ["audit", "ckpt", "--max-length", str(2**64)],
            f"--max-length: got '{2**64}', expected an integer >= 8 and <= {2**63 - 1}",
        ),
        ([*LOCALIZE, "--batch-size", "0"], "--batch-size: got '0', expected an integer >= 1"),
        ([*LOCALIZE, "--bootstrap", "-1"], "--bootstrap: got '-1', expected an integer >= 40"),
        ([*LOCALIZE, "--bootstrap", "1"], "--bootstrap: got '1', expected an integer >= 40"),
        ([*LOCALIZE, "--bootstrap", "many"], "--bootstrap: got 'many', expected an integer"),
        ([*LOCALIZE, "--top-layers", "-1"], "--top-layers: got '-1', expected an integer >= 0"),
        ([*LOCALIZE, "--ranks", "2", "0"], "--ranks: got '0', expected an integer >= 1"),
        (
            [*LOCALIZE, "--seed", "-1"],
            "--seed: got '-1', expected an integer >= 0 and <= 4294967295",
        ),
        ([*LOCALIZE, "--seed", str(2**32)], "--seed: got '4294967296', expected an integer >= 0"),
    ],
)
def test_an_integer_option_out_of_its_range_exits_2_naming_the_option_value_and_range(
    capsys: pytest.CaptureFixture[str], command: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(command)
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"spinal {command[0]}: error: argument {expected}")


def test_audit_names_a_texts_file_that_is_not_utf8(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "latin1.txt"
    texts.write_bytes("Un café au lait, s'il vous plaît.\n".encode("latin-1"))
    assert main(["audit", str(two_checkpoints[0]), "--texts", str(texts)]) == 2
    line = the_error_line(capsys)
    assert line.startswith(f"spinal audit: error: --texts {texts} is not UTF-8 text")
    assert "re-save it as UTF-8" in line


def test_localize_names_a_pairs_file_that_is_not_utf8(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = two_checkpoints
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(
        '{"prompt": "Café?", "chosen": " Oui", "rejected": " Non"}\n'.encode("cp1252")
    )
    assert (
        main(["localize", "--base", str(base), "--tuned", str(tuned), "--pairs", str(pairs)]) == 2
    )
    line = the_error_line(capsys)
    assert line.startswith(f"spinal localize: error: --pairs {pairs} is not UTF-8 text")
