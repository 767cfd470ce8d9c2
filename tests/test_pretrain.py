"""recipes/pretrain.py end to end on tiny settings, and every bad input the core issue names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _recipes import load_recipe

REPO = Path(__file__).resolve().parent.parent
pretrain = load_recipe("pretrain")

# A tiny, fast variant of the default run: same code path, smaller everything.
FAST = [
    "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--vocab_size", "320",
    "--block_size", "32", "--max_position_embeddings", "32", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "16", "--max_steps", "40", "--eval_steps", "40", "--save_steps", "20",
    "--logging_steps", "10", "--learning_rate", "5e-3", "--bf16", "false", "--disable_tqdm", "true",
    "--sample_max_new_tokens", "8",
]  # fmt: skip


def write_corpus(tmp_path: Path, name: str = "corpus.txt", paragraphs: int = 300) -> Path:
    lines = [
        f"Speaker {i % 7}:\nThe {i % 13} cats sat on mat number {i % 5}, and then they slept.\n"
        for i in range(paragraphs)
    ]
    path = tmp_path / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_main(argv: list[str]) -> dict:
    return pretrain.main(argv)


def test_pretrain_end_to_end(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "out"
    metrics = run_main(["--train_files", str(corpus), "--output_dir", str(out), "--eval_on_start", "true", *FAST])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "eval_results.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-40").is_dir()
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard events in the output dir"
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert evals[0] > 5.0 and metrics["eval_loss"] < evals[0] - 2.0, evals  # learning: eval loss drops clearly
    assert "----- sample -----" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lmkit" and config["vocab_size"] == 320 and config["hidden_size"] == 32


def test_cli_default_run_reports_one_line_error_and_exit_code(tmp_path):
    # The real command line: a wrong path is one line on stderr and exit status 2, no traceback.
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--train_files", str(tmp_path / "missing.txt"),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lmkit: error: --train_files")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def bad_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Arguments for one bad input, and a fragment the one-line error must contain."""
    good = write_corpus(tmp_path)
    if case == "missing file":
        return ["--train_files", str(tmp_path / "nope.txt")], "nope.txt"
    if case == "empty file":
        (tmp_path / "empty.txt").write_text("")
        return ["--train_files", str(tmp_path / "empty.txt")], "empty.txt"
    if case == "not utf-8":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
        return ["--train_files", str(tmp_path / "latin1.txt")], "latin1.txt"
    if case == "jsonl row without text":
        rows = [json.dumps({"text": "fine row"}), json.dumps({"text": "also fine"}), json.dumps({"body": "oops"})]
        (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
        return ["--train_files", str(tmp_path / "rows.jsonl")], "rows.jsonl:3"
    if case == "block_size over positions":
        return ["--train_files", str(good), "--block_size", "64", "--max_position_embeddings", "32"], "--block_size 64"
    if case == "tokenizer larger than vocab":
        return ["--train_files", str(good), "--tokenizer", "char", "--vocab_size", "8"], "--vocab_size 8"
    if case == "unknown config key":
        (tmp_path / "c.yaml").write_text("hidden_size: 32\nnum_layerz: 2\n")
        return ["--config", str(tmp_path / "c.yaml"), "--train_files", str(good)], "num_layerz"
    if case == "wrong value type":
        return ["--train_files", str(good), "--max_steps", "ten"], "--max_steps"
    raise AssertionError(case)


BAD_CASES = [
    "missing file", "empty file", "not utf-8", "jsonl row without text", "block_size over positions",
    "tokenizer larger than vocab", "unknown config key", "wrong value type",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_nothing_is_overwritten(tmp_path, capsys, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # something the user already had
    argv, fragment = bad_case(tmp_path, case)
    # FAST first: the case's own flags come later on the command line and win.
    with pytest.raises(SystemExit) as exit_info:
        run_main([*FAST, "--output_dir", str(out), *argv])
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmkit: error:")]
    assert len(err_lines) == 1 and fragment in err_lines[0], err_lines
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_finished_output_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}')
    (out / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(SystemExit):
        run_main([*FAST, "--train_files", str(write_corpus(tmp_path)), "--output_dir", str(out)])
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"precious"
