"""Run a recipe exactly as a user types it: ``accelerate launch recipes/X.py ...``, no accelerate config file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
# A tiny pretraining run: char tokenizer, 1 layer, 16-token blocks.
TINY_PRETRAIN = [
    "--tokenizer", "char", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
    "--block_size", "16", "--max_position_embeddings", "16", "--per_device_train_batch_size", "4",
    "--eval_strategy", "no", "--eval_on_start", "false", "--report_to", "none", "--sample_prompt", "",
    "--disable_tqdm", "true",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The user's environment as a shell has it: no OMP_NUM_THREADS (accelerate then exports 1 to its child)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTEST_CURRENT_TEST")}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", **extra)
    return env


def accelerate_cmd(recipe: str, *args: str, launcher_args: tuple[str, ...] = ()) -> list[str]:
    return [ACCELERATE, "launch", *launcher_args, str(REPO / "recipes" / f"{recipe}.py"), *args]


def start(recipe: str, *args: str, cwd: Path, launcher_args: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        accelerate_cmd(recipe, *args, launcher_args=launcher_args), cwd=cwd, env=launch_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run(recipe: str, *args: str, cwd: Path, launcher_args: tuple[str, ...] = (), timeout: float = 600,
        **env: str) -> tuple[int, str]:  # fmt: skip
    return finish(start(recipe, *args, cwd=cwd, launcher_args=launcher_args, **env), timeout)


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""
