"""DepthTrace records, and its JSON + safetensors format."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES, ContractionStatus
from spinal_callback.probe.trace import FORMAT_VERSION, DepthTrace, DepthTraceFormatError


def make_trace(**overrides: object) -> DepthTrace:
    fields: dict[str, object] = {
        "step": 7,
        "layers": [4, 5, 6, 7],
        "num_blocks": 8,
        "contraction": torch.tensor([1.0, 1.2, 1.3, 1.5]),
        "transport": torch.tensor([0.3, 0.2, 0.1]),
        "contraction_status": torch.tensor([0, 0, 1, 2], dtype=torch.int8),
        "summary": {name: float(i) / 7 for i, name in enumerate(RAMP_SUMMARY_NAMES)},
        "measure": "hellinger",
        "model_fingerprint": "m" * 16,
        "probe_fingerprint": "p" * 16,
        "metadata": {"device": "cpu"},
    }
    fields.update(overrides)
    return DepthTrace(**fields)  # type: ignore[arg-type]


def test_save_then_load_round_trips_exactly(tmp_path: Path) -> None:
    trace = make_trace()
    loaded = DepthTrace.load(trace.save(tmp_path / "trace"))
    assert loaded.to_dict() == trace.to_dict()
    assert loaded.contraction.dtype == torch.float32
    assert loaded.contraction_status.dtype == torch.int8


@pytest.mark.fault
def test_saved_files_are_json_and_safetensors_not_pickle(tmp_path: Path) -> None:
    directory = make_trace().save(tmp_path / "trace")
    assert sorted(p.name for p in directory.iterdir()) == ["trace.json", "trace.safetensors"]
    assert json.loads((directory / "trace.json").read_text())["format_version"] == FORMAT_VERSION
    assert not (directory / "trace.safetensors").read_bytes().startswith(b"\x80")


def test_loading_a_newer_format_version_says_to_upgrade(tmp_path: Path) -> None:
    directory = make_trace().save(tmp_path / "trace")
    header = json.loads((directory / "trace.json").read_text())
    header["format_version"] = FORMAT_VERSION + 1
    (directory / "trace.json").write_text(json.dumps(header))
    with pytest.raises(DepthTraceFormatError, match="upgrade spinal-callback"):
        DepthTrace.load(directory)


def test_loading_corrupted_tensors_is_reported(tmp_path: Path) -> None:
    directory = make_trace().save(tmp_path / "trace")
    data = bytearray((directory / "trace.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (directory / "trace.safetensors").write_bytes(bytes(data))
    with pytest.raises(DepthTraceFormatError, match="corrupted"):
        DepthTrace.load(directory)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:8] + b"{not json" + data[17:], id="garbled-header"),
        pytest.param(lambda data: b"\x01", id="too-short"),
    ],
)
def test_unreadable_tensors_whose_checksum_was_rewritten_are_a_format_error(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    directory = make_trace().save(tmp_path / "trace")
    tensor_path, json_path = directory / "trace.safetensors", directory / "trace.json"
    tensor_path.write_bytes(damage(tensor_path.read_bytes()))
    header = json.loads(json_path.read_text())
    header["tensors_sha256"] = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    json_path.write_text(json.dumps(header))
    with pytest.raises(DepthTraceFormatError, match="re-run the probe") as raised:
        DepthTrace.load(directory)
    assert str(tensor_path) in str(raised.value)


def test_loading_truncated_json_is_reported(tmp_path: Path) -> None:
    directory = make_trace().save(tmp_path / "trace")
    text = (directory / "trace.json").read_text()
    (directory / "trace.json").write_text(text[: len(text) // 2])
    with pytest.raises(DepthTraceFormatError, match="not valid JSON"):
        DepthTrace.load(directory)


def test_loading_json_with_missing_fields_is_reported(tmp_path: Path) -> None:
    directory = make_trace().save(tmp_path / "trace")
    header = json.loads((directory / "trace.json").read_text())
    del header["summary"]
    (directory / "trace.json").write_text(json.dumps(header))
    with pytest.raises(DepthTraceFormatError, match="not a complete DepthTrace"):
        DepthTrace.load(directory)


def test_loading_a_missing_trace_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trace.json is missing"):
        DepthTrace.load(tmp_path)


def test_trace_rejects_transport_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"transport has shape \(4,\), expected \(3,\)"):
        make_trace(transport=torch.zeros(4))


def test_notes_explain_flagged_layers() -> None:
    notes = make_trace().notes
    assert len(notes) == 2
    assert notes[0].startswith("layer 6: activations are rank-deficient")
    assert notes[1].startswith("layer 7: activations are constant")
    assert ContractionStatus.DEGENERATE == 2


def test_is_finite_detects_nan_scores_and_summaries() -> None:
    assert make_trace().is_finite
    assert not make_trace(contraction=torch.tensor([1.0, float("nan"), 1.0, 1.0])).is_finite
    summary = {name: 0.0 for name in RAMP_SUMMARY_NAMES} | {"tortuosity": float("inf")}
    assert not make_trace(summary=summary).is_finite


def test_depth_is_normalised_by_the_number_of_blocks() -> None:
    torch.testing.assert_close(make_trace().depth, torch.tensor([4, 5, 6, 7]) / 7.0)


def test_from_dict_inverts_to_dict() -> None:
    trace = make_trace()
    assert (
        DepthTrace.from_dict(json.loads(json.dumps(trace.to_dict()))).to_dict() == trace.to_dict()
    )


def test_a_trace_with_a_neutral_trace_round_trips_through_files_and_dicts(
    tmp_path: Path,
) -> None:
    neutral = make_trace(lens_entropy=torch.tensor([3.0, 2.5, 2.0, 1.5]), next_token_nll=2.25)
    trace = make_trace(lens_entropy=torch.tensor([4.0, 3.0, 2.0, 1.0]), neutral=neutral)
    loaded = DepthTrace.load(trace.save(tmp_path / "trace"))
    assert loaded.to_dict() == trace.to_dict()
    assert loaded.neutral is not None and loaded.neutral.next_token_nll == 2.25
    assert DepthTrace.from_dict(trace.to_dict()).to_dict() == trace.to_dict()


def test_a_non_finite_neutral_trace_makes_the_trace_non_finite() -> None:
    neutral = make_trace(next_token_nll=float("inf"))
    assert make_trace().is_finite and not make_trace(neutral=neutral).is_finite


def test_a_format_1_trace_still_loads_without_the_newer_fields(tmp_path: Path) -> None:
    directory = make_trace().save(tmp_path / "trace")
    header = json.loads((directory / "trace.json").read_text())
    for name in ("next_token_nll", "neutral"):
        header.pop(name, None)
    header["format_version"] = 1
    (directory / "trace.json").write_text(json.dumps(header))
    loaded = DepthTrace.load(directory)
    assert loaded.lens_entropy is None and loaded.next_token_nll is None and loaded.neutral is None
