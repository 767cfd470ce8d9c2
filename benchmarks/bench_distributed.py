"""Tokens/s per process for single-process, DDP, ZeRO-2 and ZeRO-3 training of the same model, side by side.

Every mode runs recipes/pretrain.py with the same model and per-process batch, through `accelerate launch` and
the shipped accelerate_configs/, for a fixed number of steps. Throughput is what the trainer logs
(`tokens_per_second`, all processes together) over the steps after warm-up, divided by the process count;
the ratio column is that per-process rate against the single process (1.00 = free scaling). On a CPU every
process gets one thread, as torchrun gives each rank, so the per-process rates compare like for like.

    python benchmarks/bench_distributed.py                      # 2 processes, tiny model, CPU or GPUs
    python benchmarks/bench_distributed.py --num_processes 8 --steps 100 -- --config recipes/configs/gpt2-small.yaml

Arguments after ``--`` go to the recipe unchanged (they override the benchmark's model and batch).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = [
    ("single", "single_gpu.yaml"),
    ("DDP", "ddp.yaml"),
    ("ZeRO-2", "deepspeed_zero2.yaml"),
    ("ZeRO-3", "deepspeed_zero3.yaml"),
]
# A small model that still spends most of a step in matmuls: ~1.6M parameters, 4 x 128 tokens per process.
MODEL = {
    "tokenizer": "char",
    "vocab_size": 128,
    "block_size": 128,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "per_device_train_batch_size": 4,
    "learning_rate": 1.0e-3,
    "warmup_steps": 0,
    "logging_steps": 5,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "sample_prompt": "",
    "eval_on_start": False,
    "bf16": False,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_mode(config: str, processes: int, steps: int, workdir: Path, recipe_args: list[str]) -> float:
    """Launch one mode; return the mean tokens/s over the logged intervals after the first one (warm-up)."""
    out = workdir / config.removesuffix(".yaml")
    preset = workdir / "bench.yaml"
    preset.write_text(json.dumps({**MODEL, "max_steps": steps}))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / config),
        "--num_processes", str(processes), "--main_process_port", str(_free_port()),
        str(REPO / "recipes" / "pretrain.py"),
        "--config", str(preset), "--output_dir", str(out), "--overwrite_output_dir", "true", *recipe_args,
    ]  # fmt: skip
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if not _has_gpu():  # torchrun gives each rank 1 thread; give the single process the same, so per-process compares
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-4000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rates = [h["tokens_per_second"] for h in history if "tokens_per_second" in h]
    if len(rates) < 2:
        raise SystemExit(f"{config}: too few logged intervals ({len(rates)}); raise --steps")
    return statistics.mean(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2, help="processes for DDP / ZeRO-2 / ZeRO-3")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    parser.add_argument("recipe_args", nargs="*", help="after --: extra recipe flags")
    args = parser.parse_args()
    from lmkit.distributed import prebuild_deepspeed_ops

    prebuild_deepspeed_ops()  # compile DeepSpeed's ops here, not inside the timed launches

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        for name, config in MODES:
            processes = 1 if name == "single" else args.num_processes
            total = run_mode(config, processes, args.steps, Path(tmp), args.recipe_args)
            rows.append((name, processes, total, total / processes))
            print(f"  {name}: {total:,.0f} tokens/s over {processes} process(es)", file=sys.stderr, flush=True)

    import torch

    device = torch.cuda.get_device_name(0) if _has_gpu() else f"CPU ({os.cpu_count()} cores, 1 thread per process)"
    base = rows[0][3]
    print(
        f"\n{device}; {args.steps} steps; per process {MODEL['per_device_train_batch_size']} x {MODEL['block_size']} tokens"
    )
    print(f"{'mode':<8} {'procs':>5} {'tokens/s total':>15} {'tokens/s/proc':>14} {'vs single':>10}")
    for name, processes, total, per_process in rows:
        print(f"{name:<8} {processes:>5} {total:>15,.0f} {per_process:>14,.0f} {per_process / base:>9.2f}x")


if __name__ == "__main__":
    main()
