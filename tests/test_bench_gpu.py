"""``make bench-gpu`` is ready to run when a GPU is lent: its dry run goes through every row on a
CPU (small shapes) and prints the one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_pass_dry_run_prints_one_table_with_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    assert "GPU pass on CPU (dry run: small shapes)" in table
    for row in (
        "probe time x bare forward: Llama-3.2-1B shape",
        "peak memory x bare forward: Qwen2.5-0.5B shape",
        "overhead at every_n_steps=50",
        "overhead at every_n_steps=auto",
        "pytest -m gpu",
    ):
        assert row in table, row
    record = json.loads(out.read_text())
    assert record["dry_run"] and len(record["probes"]) == 2 and len(record["overhead"]) == 2


def test_without_a_gpu_the_full_pass_says_how_to_test_it() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full pass runs")
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "pass --device cpu --dry-run" in done.stderr
