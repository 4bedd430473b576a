"""A long run of the real runner: resident memory, time per 100 probes and checkpoint state size.

Drives ``Runner`` the way the HF adapter does, on the tiny Llama: a probe at every step (so 500
steps are 500 probes), TensorBoard and the event log written, the heatmap every ``image_every``
probes, and the callback state serialised after every probe (the HF adapter refreshes it for
the next checkpoint). Between probes a small AdamW step on a language-model loss moves the
weights. Prints, every 100 probes, ``VmRSS`` (MiB), the wall and CPU seconds of those 100 steps,
and the size of the serialised state (bytes) beside what it would be with the trace history
inline, as checkpoints held it before ``TraceHistory``; then one JSON line.

    python -m bench.long_run                 # 500 probes
    python -m bench.long_run --probes 1000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from spinal_callback.config import SpinalConfig
from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.outputs.event_log import EventLog
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.outputs.tensorboard import TraceBoard
from spinal_callback.training.runner import Runner


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=500)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(4, len(tokenizer), (8, 24))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        runner = Runner(SpinalConfig(every_n_steps=1, stop_on=None), list(DEFAULT_PROBE_TEXTS))
        runner.setup(model, tokenizer)
        outputs = Outputs(
            TraceBoard.open(directory), EventLog(Path(directory) / "events.jsonl"), owns_board=True
        )
        runner.begin(0, outputs, directory)
        wall, cpu = time.perf_counter(), time.process_time()
        for step in range(1, args.probes + 1):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            runner.step(step)
            if step % 10 == 0:
                runner.logs(step, {"loss": 0.69 - 1e-4 * step})  # a DPO loss, slowly falling
            state_bytes = len(json.dumps(runner.state_dict()))
            if step % 100 == 0:
                now_wall, now_cpu = time.perf_counter(), time.process_time()
                row = {
                    "probes": step,
                    "rss_mib": round(resident_mib(), 1),
                    "wall_s_per_100": round(now_wall - wall, 2),
                    "cpu_s_per_100": round(now_cpu - cpu, 2),
                    "state_bytes": state_bytes,
                    "inline_history_bytes": len(
                        json.dumps([trace.to_dict() for trace in runner.traces])
                    ),
                }
                wall, cpu = now_wall, now_cpu
                rows.append(row)
                print(
                    f"probes {step:5d}  rss {row['rss_mib']:7.1f} MiB  "
                    f"wall {row['wall_s_per_100']:6.2f} s/100  cpu {row['cpu_s_per_100']:6.2f} "
                    f"s/100  state {state_bytes} B (history inline, as before: "
                    f"{row['inline_history_bytes']} B)",
                    flush=True,
                )
        runner.end(args.probes)
    print(json.dumps({"bench": "long_run", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
