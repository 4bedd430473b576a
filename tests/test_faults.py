"""A whole TRL run on a really broken filesystem: it finishes, probes on schedule, keeps its
alerts, and says once what failed. Each case runs in a subprocess under ``unshare -rm`` with a
tmpfs (full, or read-only) as the log directory; skipped where unprivileged mounts are not
allowed. The same faults injected as ``OSError`` are in test_runner.py and test_tensorboard.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def can_mount(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    target = tmp_path / "probe-mount"
    target.mkdir()
    command = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {target}"]
    return subprocess.run(command, capture_output=True).returncode == 0


def run_with_log_dir(
    tmp_path: Path, mount: str, extra: list[str] | None = None
) -> tuple[dict, str]:
    """``tests.faults.trl_run`` with ``<tmp>/logs`` mounted as ``mount`` (a shell snippet)."""
    if not can_mount(tmp_path):
        pytest.skip("unprivileged mount namespaces are not allowed here")
    logs = tmp_path / "logs"
    logs.mkdir()
    script = f"{mount.format(dir=logs)} && exec {sys.executable} -m tests.faults.trl_run"
    args = [str(logs / "spinal"), str(tmp_path / "out"), *(extra or [])]
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"{script} {' '.join(args)}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.fault
def test_a_full_disk_under_the_log_dir_does_not_stop_training(tmp_path: Path) -> None:
    result, stderr = run_with_log_dir(tmp_path, "mount -t tmpfs -o size=16k tmpfs {dir}")
    assert result["steps"] == 8 and result["probes"] == [0, 2, 4, 6, 8]
    assert "No space left on device" in stderr


@pytest.mark.fault
def test_a_read_only_log_dir_does_not_stop_training(tmp_path: Path) -> None:
    read_only = "mount -t tmpfs -o size=1m tmpfs {dir} && mount -o remount,ro {dir}"
    result, stderr = run_with_log_dir(tmp_path, read_only)
    assert result["steps"] == 8 and result["probes"] == [0, 2, 4, 6, 8]
    assert "Read-only file system" in stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.fault
def test_an_event_log_on_dev_full_does_not_stop_training(tmp_path: Path) -> None:
    result, stderr = run_with_log_dir(
        tmp_path, "mount -t tmpfs -o size=8m tmpfs {dir}", ["/dev/full"]
    )
    assert result["steps"] == 8 and result["alerts"]
    assert stderr.count("writing the event log /dev/full failed") == 1
