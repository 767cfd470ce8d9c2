"""The default job as a user types it, before and after lmkit chose the CPU thread count itself.

    python benchmarks/bench_default_launch.py                 # full default job, 2 repeats each, alternated
    python benchmarks/bench_default_launch.py --max_steps 300 --repeats 3

"before" is `accelerate launch recipes/pretrain.py --num_threads 1`: what the launcher's own OMP_NUM_THREADS=1
gave every CPU run until lmkit stopped taking it for a choice. "after" is `accelerate launch recipes/pretrain.py`.
Each run trains in a fresh output dir from a clean environment (no OMP_NUM_THREADS); tokens/s is the median of the
Trainer's logged intervals (the first one, which holds start-up, left out). Prints one table, naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    marks = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags]
    return f"{name} ({', '.join(marks) or 'no bf16 matmul flags'}), {len(os.sched_getaffinity(0))} cores"


def one_run(extra: list[str], max_steps: int | None, workdir: Path) -> tuple[float, float]:
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", str(REPO / "recipes" / "pretrain.py"), "--output_dir", str(out), *extra]
    if max_steps:
        cmd += ["--max_steps", str(max_steps)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rates = [h["tokens_per_second"] for h in history if "tokens_per_second" in h][1:]
    return statistics.median(rates), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=None, help="Cut the default job short (default: all 600).")
    args = parser.parse_args()
    variants = {"before (--num_threads 1)": ["--num_threads", "1"], "after (default)": []}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, extra in variants.items():  # alternated, so drift on a shared machine hits both alike
                results[name].append(one_run(extra, args.max_steps, Path(tmp)))
                print(f"repeat {r + 1} {name}: {results[name][-1][0]:,.0f} tok/s, {results[name][-1][1]:.0f} s wall")
    print(f"\nCPU: {cpu_name()}")
    print("| run | tokens/s (median of repeats) | wall s | ratio |")
    print("|---|---|---|---|")
    base = statistics.median(t for t, _ in results["before (--num_threads 1)"])
    for name, runs in results.items():
        tps = statistics.median(t for t, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(f"| {name} | {tps:,.0f} | {wall:.0f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
