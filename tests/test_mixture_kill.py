"""A two-source mixture through recipes/pretrain.py, killed with SIGKILL between checkpoints, then rerun with
``--resume_from_checkpoint auto``: every per-step loss and the final weights equal an uninterrupted run's, bit for
bit, map-style and streaming. (tests/test_mixture.py stops the trainer in-process; this is the real process.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_soak import ENV, step_losses

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY, KILL_AFTER = 40, 10, 25  # killed in step 26: resumes from checkpoint-20 and replays 21..25


def command(corpora: dict[str, Path], out: Path, streaming: bool) -> list[str]:
    sources = [
        {"name": name, "files": str(path), "weight": w}
        for (name, path), w in zip(corpora.items(), (0.7, 0.3), strict=True)
    ]
    return [
        sys.executable, str(REPO / "recipes" / "pretrain.py"), "--datasets", json.dumps(sources),
        "--streaming", str(streaming).lower(), "--tokenizer", "char", "--hidden_size", "32",
        "--num_hidden_layers", "1", "--num_attention_heads", "2", "--block_size", "16",
        "--max_position_embeddings", "16", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--logging_steps", "1", "--eval_strategy", "no",
        "--eval_on_start", "false", "--report_to", "none", "--sample_prompt", "", "--bf16", "false",
        "--disable_tqdm", "true", "--output_dir", str(out), "--resume_from_checkpoint", "auto",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    text = (REPO / "lmkit" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    root = tmp_path_factory.mktemp("mix")
    books, code = root / "books.txt", root / "code.txt"
    books.write_text(text[:30000], encoding="utf-8")
    code.write_text(text[30000:60000].upper(), encoding="utf-8")  # another alphabet: the two sources differ
    return {"books": books, "code": code}


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long`; test_mixture.py resumes in-process
@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_kill9_then_auto_resume_matches_uninterrupted(corpora, tmp_path, streaming):
    ref = tmp_path / "ref"
    done = subprocess.run(command(corpora, ref, streaming), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("Streaming mixture" if streaming else "Mixture of 2 sources: books 1,588 blocks") in done.stdout

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(corpora, out, streaming), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    seen = 0
    for line in proc.stdout:  # the printer callback writes one dict per logged step
        seen += "'loss'" in line
        if seen == KILL_AFTER:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the run ended before its kill"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    assert not (out / "model.safetensors").exists()

    resumed = subprocess.run(command(corpora, out, streaming), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-20'}" in resumed.stdout  # the newest checkpoint, not from scratch
    if streaming:  # the mixture's saved position (each source's own), not a replay from the start
        assert "resuming the stream at its saved position (row 160)" in resumed.stdout
    losses, ref_losses = step_losses(out), step_losses(ref)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref_losses
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
