"""Soak: 300 steps of a tiny model, checkpoints every 20 (keeping 2), three kill -9 + ``auto`` resume cycles at
random moments; the final weights and every per-step loss equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
STEPS = 300


def command(corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "recipes" / "pretrain.py"), "--train_files", str(corpus), "--tokenizer", "char",
        "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--block_size", "16",
        "--max_position_embeddings", "16", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_steps", str(STEPS), "--save_steps", "20", "--save_total_limit", "2", "--logging_steps", "1",
        "--eval_strategy", "no", "--eval_on_start", "false", "--report_to", "none", "--sample_prompt", "",
        "--bf16", "false", "--disable_tqdm", "true", "--output_dir", str(out), "--resume_from_checkpoint", "auto",
    ]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def step_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@pytest.mark.slow
def test_three_kill9_resume_cycles_match_uninterrupted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "lmkit" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30000])
    ref = tmp_path / "ref"
    done = subprocess.run(command(corpus, ref), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    seed = int(os.environ.get("LMKIT_SOAK_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    out = tmp_path / "killed"
    kills = 0
    for _ in range(3):
        # The same command every time, as a requeue loop would run it: `auto` resumes from the newest complete one.
        proc = subprocess.Popen(
            command(corpus, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        target = rng.randint(5, 60)  # logged steps of this process before the kill
        seen = 0
        for line in proc.stdout:
            seen += "'loss'" in line
            if seen >= target:
                time.sleep(rng.uniform(0, 0.05))  # anywhere in the next step, its save included
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
        proc.wait(timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before its kill"
    final = subprocess.run(command(corpus, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills == 3

    assert not list(out.glob(".tmp-*"))
    assert len(list(out.glob("checkpoint-*"))) <= 2
    assert step_losses(out) == step_losses(ref), f"seed {seed}"
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}"
