"""Cost of ``TraceBoard`` over a long run: resident memory and time per 100 probes.

Writes synthetic depth traces (with a reference) to a ``TraceBoard`` in a temporary directory
the way a training session does: every probe writes the trace, the alert level and a flush;
every ``--image-every`` probes it also writes the heatmap of the whole history so far. Prints,
every 100 probes, the resident set size (MiB, ``VmRSS`` from ``/proc/self/status``), and the wall
and CPU time (seconds, this process's threads together) of those 100 probes, then a JSON line with
all the figures. On a busy machine the CPU time is the steadier of the two.

    python -m bench.board_growth                     # 500 probes, heatmap every 10
    python -m bench.board_growth --probes 1000 --layers 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from spinal_callback.outputs.tensorboard import TraceBoard
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.trace import DepthTrace


def synthetic_trace(step: int, layers: int, generator: torch.Generator) -> DepthTrace:
    """A trace of ``layers`` late blocks (of ``2 * layers``) with random scores at ``step``."""
    band = list(range(layers, 2 * layers))
    return DepthTrace(
        step=step,
        layers=band,
        num_blocks=2 * layers,
        contraction=1.0 + torch.rand(layers, generator=generator),
        transport=torch.rand(layers - 1, generator=generator),
        contraction_status=torch.zeros(layers, dtype=torch.int8),
        summary={name: float(torch.rand(1, generator=generator)) for name in RAMP_SUMMARY_NAMES},
        measure="hellinger",
        model_fingerprint="m" * 16,
        probe_fingerprint="p" * 16,
    )


def resident_mib() -> float:
    """Resident set size of this process in MiB (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line; run this bench on Linux")


def run(probes: int, image_every: int, layers: int, log_dir: str) -> list[dict[str, float]]:
    """Write ``probes`` probes; one row (probes done, RSS MiB, wall and CPU seconds of the last
    100 probes) every 100 probes."""
    from torch.utils.tensorboard import SummaryWriter

    generator = torch.Generator().manual_seed(0)
    reference = synthetic_trace(0, layers, generator)
    board = TraceBoard(SummaryWriter(log_dir))
    history: list[DepthTrace] = []
    rows = [{"probes": 0.0, "rss_mib": resident_mib(), "wall_s": 0.0, "cpu_s": 0.0}]
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(1, probes + 1):
        trace = synthetic_trace(index * 10, layers, generator)
        history.append(trace)
        board.write_trace(trace, reference)
        board.write_alerts(trace.step, [])
        if index % image_every == 0:
            board.write_heatmap(history)
        board.flush()
        if index % 100 == 0:
            now_wall, now_cpu = time.perf_counter(), time.process_time()
            rows.append(
                {
                    "probes": index,
                    "rss_mib": resident_mib(),
                    "wall_s": now_wall - wall,
                    "cpu_s": now_cpu - cpu,
                }
            )
            wall, cpu = now_wall, now_cpu
    board.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=500)
    parser.add_argument("--image-every", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as log_dir:
        rows = run(args.probes, args.image_every, args.layers, log_dir)
    for row in rows[1:]:
        print(
            f"probes {int(row['probes']):5d}  rss {row['rss_mib']:7.1f} MiB  last 100 probes: "
            f"wall {row['wall_s']:6.2f} s, cpu {row['cpu_s']:6.2f} s"
        )
    print(json.dumps({"rss_start_mib": rows[0]["rss_mib"], "rows": rows[1:]}))


if __name__ == "__main__":
    main()
