"""Each summary reaches each logger once: MLflow and W&B get them through ``on_log``, TensorBoard
from the ``TraceBoard`` only. Real HF integrations on a short TRL run, all offline: MLflow on a
local file store, W&B in offline mode, each read back from what it wrote to disk."""

from __future__ import annotations

import copy
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.demos.preference_data import make_preference_pairs
from spinal_callback.integrations.transformers import SpinalTrainerCallback, run_first
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES

FORWARDED = [*(f"spinal/ramp/{name}" for name in RAMP_SUMMARY_NAMES), "spinal/alert_level"]
LOG_STEPS = [2, 4]
"""``logging_steps=2`` over ``max_steps=4``: each log carries the probe of its own step."""
PROBE_STEPS = [0, 2, 4]


@pytest.fixture
def train_reporting_to(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, make_model: Callable[..., PreTrainedModel]
) -> Callable[..., tuple[SpinalTrainerCallback, Path]]:
    """Train a TRL ``DPOTrainer`` 4 steps (probe every 2, log every 2) reporting to the given
    integrations, with ``run_first``; returns the callback and the output directory. The
    learning rate is DPO's default, so the run stays quiet: every alert level is 0."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    def train(*report_to: str) -> tuple[SpinalTrainerCallback, Path]:
        policy = make_model("llama", layers=4)
        output = tmp_path / "run"
        args = trl.DPOConfig(
            output_dir=str(output),
            max_steps=4,
            per_device_train_batch_size=8,
            logging_steps=2,
            save_strategy="no",
            report_to=list(report_to),
            use_cpu=True,
            disable_tqdm=True,
        )
        spinal = SpinalTrainerCallback(every_n_steps=2)
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=copy.deepcopy(policy),
            args=args,
            train_dataset=datasets.Dataset.from_list(make_preference_pairs(32)),
            processing_class=tokenizer,
            callbacks=[spinal],
        )
        run_first(trainer, spinal)
        trainer.train()
        assert spinal.alerts == [], "the run was meant to be quiet"
        return spinal, output

    return train


def expected_series(spinal: SpinalTrainerCallback, key: str) -> dict[int, float]:
    """What the logs at ``LOG_STEPS`` carry under ``key``: that step's probe."""
    traces = {trace.step: trace for trace in spinal.traces}
    if key == "spinal/alert_level":
        return dict.fromkeys(LOG_STEPS, 0.0)
    name = key.removeprefix("spinal/ramp/")
    return {step: traces[step].summary[name] for step in LOG_STEPS}


def test_mlflow_gets_the_ramp_summaries_and_the_alert_level(
    train_reporting_to: Callable[..., tuple[SpinalTrainerCallback, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3 refuses its file store unless asked; the database store needs the full package.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    spinal, _ = train_reporting_to("mlflow")
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(experiment_ids=["0"])
    # HF's MLflowCallback replaces characters outside [0-9A-Za-z_\-. :/] and MLflow accepts
    # slashes, so the keys are stored as they are logged, with no ``train/`` prefix.
    for key in FORWARDED:
        history = client.get_metric_history(run.info.run_id, key)
        logged = {metric.step: metric.value for metric in history}
        assert logged == pytest.approx(expected_series(spinal, key), rel=1e-6), key


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline run's ``.wandb`` file: a 7-byte header (``:W&B``, a 2-byte
    magic, a version byte), then LevelDB-log chunks in 32 KiB blocks (CRC32, 2-byte length,
    1-byte type: 1 full, 2 first, 3 middle, 4 last; a block's tail under 7 bytes is padding),
    each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, chunks = 7, []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """Each ``wandb.log`` row of an offline run, keys as W&B shows them."""
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def test_wandb_offline_gets_the_ramp_summaries_and_the_alert_level(
    train_reporting_to: Callable[..., tuple[SpinalTrainerCallback, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for variable, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_SILENT": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_META": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(variable, value)
    try:
        spinal, _ = train_reporting_to("wandb")
    finally:
        # HF leaves the run open; the offline file is complete once the service has shut down.
        wandb.finish()
        wandb.teardown()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    for key in FORWARDED:
        # HF's WandbCallback prefixes the training logs with ``train/``.
        logged = {
            row["train/global_step"]: row[f"train/{key}"] for row in rows if f"train/{key}" in row
        }
        assert logged == pytest.approx(expected_series(spinal, key), rel=1e-6), key


def tensorboard_runs(root: Path) -> dict[str, dict[str, list[int]]]:
    """Per run under ``root`` (as TensorBoard lists them), per tag, the steps of its points."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"scalars": 0})
    multiplexer.AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    runs = {}
    for run in multiplexer.Runs():
        events = multiplexer.GetAccumulator(run)
        runs[run] = {tag: [e.step for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    return runs


def test_tensorboard_charts_each_summary_once_and_the_console_still_prints_it(
    train_reporting_to: Callable[..., tuple[SpinalTrainerCallback, Path]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _, output = train_reporting_to("tensorboard")
    runs = tensorboard_runs(output / "runs")
    trainer_runs = [run for run, tags in runs.items() if "train/loss" in tags]
    assert len(trainer_runs) == 1, sorted(runs)
    # HF's own run charts the trainer's logs only: no ``train/spinal/...`` beside ``spinal/...``.
    assert [tag for tag in runs[trainer_runs[0]] if "spinal" in tag] == []
    for run, tags in runs.items():
        twice = {
            tag: steps
            for tag, steps in tags.items()
            if "spinal" in tag and max(Counter(steps).values()) > 1
        }
        assert twice == {}, f"run {run!r} has points written twice at one step"
    for key in FORWARDED:
        assert runs["spinal"][key] == PROBE_STEPS, key
    printed = capsys.readouterr().out
    assert all(f"'{key}'" in printed for key in FORWARDED)
