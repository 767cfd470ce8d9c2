"""The benchmark scripts run: the GPU check's no-CUDA skip, the break-even arithmetic, a tiny fine-tuning table."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path needs a machine without CUDA")
def test_gpu_check_skips_without_cuda():
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "no CUDA device: skipped\n"
    assert time.perf_counter() - start < 10  # no torch import: the device node check answers first


def test_break_even_measured_extrapolated_and_never():
    bench = load("bench_compile")
    eager = [0.1 * n for n in range(1, 11)]  # 100 ms steps
    # Compiles for 0.5 s, then 50 ms steps: elapsed 0.55, 0.60, ... meets eager's 0.1 n at n = 10.
    assert bench.break_even([0.5 + 0.05 * n for n in range(1, 11)], eager) == (10, True)
    # Compiles for 2 s: 10 steps in 2.5 s vs 1.0 s, then it gains 50 ms a step: 10 + 1.5 / 0.05 = 40 steps.
    steps, measured = bench.break_even([2.0 + 0.05 * n for n in range(1, 11)], eager)
    assert not measured and steps == pytest.approx(40)
    assert bench.break_even([2.0 + 0.1 * n for n in range(1, 11)], eager) == (None, False)


def test_gemm_floor_counts_every_matmul_of_a_step_once():
    """The GEMMs the floor times do the model's FLOPs: 6N per token, plus half of PaLM's attention term."""
    from lmkit import LMConfig
    from lmkit.perf import training_flops_per_token

    bench = load("bench_throughput")
    config = LMConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    B, T = 2, 24
    groups = bench.step_gemms(config, B, T)
    assert len(groups) == 3 * 5 + 1  # q/k/v, o, attention, gate/up, down per layer; the head
    for group in groups:  # a fused form does the same work as the separate one
        assert len({bench.gemm_flops(alternative) for alternative in group}) == 1
    total = sum(bench.gemm_flops(group[0]) for group in groups)
    attention = 12 * 3 * 64 * T  # 12 L q_dim T per token, of which a causal kernel does half
    assert total == B * T * (training_flops_per_token(config, T) - attention // 2)
    # intermediate 192: 6 x 48 x (64 x (64 + 2 x 32) + 64 x 64 + 3 x 64 x 192) x 3 layers, + head 6 x 48 x 64 x 96
    assert total == 6 * 48 * (3 * (64 * 128 + 64 * 64 + 3 * 64 * 192) + 64 * 96) + 48 * 6 * 3 * 64 * 24


def test_counting_collator_counts_loss_tokens():
    bench = load("bench_finetune")
    shifted = bench.CountingCollator(lambda rows: {"labels": torch.tensor(rows)}, shifted=True)
    unshifted = bench.CountingCollator(lambda rows: {"labels": torch.tensor(rows)}, shifted=False)
    rows = [[-100, 5, 6, -100], [-100, -100, 7, 8]]
    shifted(rows)
    unshifted(rows)
    # lmkit's labels are already the targets: 4 tokens; TRL's model drops the first label of each row: also 4.
    assert shifted.counts == [4]
    assert unshifted.counts == [4]
    unshifted([[9, 5, -100, 6]])  # the first label is never a target
    assert unshifted.counts == [4, 2]


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@pytest.mark.slow
def test_bench_finetune_tiny_table():
    """lmkit and TRL train the same tokens from the same weights: equal losses on the unpacked row."""
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_finetune.py"),
            "--only",
            "full",
            "--repeats",
            "1",
            "--rows",
            "32",
            "--eval_rows",
            "8",
            "--hidden_size",
            "32",
            "--num_layers",
            "2",
            "--block_size",
            "64",
            "--vocab_size",
            "512",
            "--warmup",
            "1",
            "--lmkit_order",
            "random",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        cells[0]: cells
        for line in proc.stdout.splitlines()
        if line.startswith("| full")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {"full lmkit", "full trl"}
    lmkit, trl = rows["full lmkit"], rows["full trl"]
    assert lmkit[1] == trl[1] == "4"  # 32 examples / micro-batch 8
    assert lmkit[3].endswith("x") and trl[3] == "-"
    assert float(lmkit[2]) > 0 and float(lmkit[4]) > 0
    assert float(lmkit[6]) == pytest.approx(float(trl[6]), abs=2e-3)  # train loss
    assert float(lmkit[7]) == pytest.approx(float(trl[7]), abs=2e-3)  # eval loss
