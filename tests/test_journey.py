"""A user's first hour, typed as the README types it: every step is ``accelerate launch recipes/X.py`` on the previous
step's default output, run from a fresh working directory, and every output is read back by stock tools.

pretrain (tiny preset, bundled corpus) -> finetune on prompt/completion rows -> finetune on chats -> LoRA with merge
-> DPO on preference pairs -> evaluate -> generate -> publish --dry_run. Only the step counts are cut down; sizes and paths are the defaults.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from _accelerate import REPO, run
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmkit  # noqa: F401  (a user's own script: the Auto classes know lmkit's model)

pytestmark = pytest.mark.slow

QUESTIONS = [("What is the capital of France?", "Paris."), ("Name a colour.", "Blue."), ("Two plus two?", "Four.")]
SHORT = ["--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1"]


def _ok(step: tuple[int, str]) -> str:
    code, output = step
    assert code == 0, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    return output


def _load_without_lmkit(path, check: str) -> str:
    """Run ``check`` in a fresh interpreter that cannot import lmkit, with ``model`` and ``tok`` loaded from ``path``
    through the Auto classes (remote code); returns its stdout."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, *a):\n"
        "        if name == 'lmkit' or name.startswith('lmkit.'): raise ImportError('lmkit is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)\n"
        f"tok = AutoTokenizer.from_pretrained({str(path)!r})\n" + check
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_pretrain_finetune_evaluate_generate_publish_on_defaults(tmp_path):
    home = tmp_path  # the user's working directory: every default output path is relative to it
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}

    # -- pretrain: the tiny preset on the bundled corpus -----------------------------------------------------
    out = _ok(run("pretrain", "--max_steps", "30", "--eval_steps", "15", "--sample_max_new_tokens", "10", cwd=home,
                  **env))  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    assert f"threads {cores} ({cores} cores / 1 process)" in out  # all cores, although accelerate exported 1
    pretrain = home / "outputs" / "pretrain"
    history = json.loads((pretrain / "trainer_state.json").read_text())["log_history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.5, evals  # it learned (held-out loss)
    assert "----- sample -----" in out
    config = json.loads((pretrain / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lmkit.LMForCausalLM"
    assert config["max_position_embeddings"] == 128

    # -- finetune on prompt/completion rows: sft-full's block_size 512 follows the model's 128 positions --------
    rows = [{"prompt": q, "completion": " " + a} for q, a in QUESTIONS * 20]
    (home / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _ok(run("finetune", "--model_name_or_path", "outputs/pretrain", "--train_files", "qa.jsonl", *SHORT,
                  cwd=home, **env))  # fmt: skip
    assert re.search(r"block_size.*128", out), out[-3000:]  # the one log line that says the default followed
    sft = home / "outputs" / "sft-full"
    assert (sft / "model.safetensors").exists() and (sft / "modeling_lmkit.py").exists()
    assert json.loads((sft / "eval_results.json").read_text())["eval_loss"] > 0

    # -- finetune on chats (ChatML markers added as tokens) ---------------------------------------------------
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    (home / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats * 20))
    _ok(run("finetune", "--model_name_or_path", "outputs/pretrain", "--train_files", "chat.jsonl", "--output_dir",
            "outputs/sft-chat", *SHORT, cwd=home, **env))  # fmt: skip
    chat = home / "outputs" / "sft-chat"
    chat_tokenizer = AutoTokenizer.from_pretrained(chat)
    rendered = chat_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered.startswith("<|im_start|>user\nHi<|im_end|>"), rendered

    # -- LoRA on the SFT model, merged ------------------------------------------------------------------------
    _ok(run("finetune", "--model_name_or_path", "outputs/sft-full", "--train_files", "qa.jsonl", "--use_lora", "true",
            "--merge_lora", "true", "--output_dir", "outputs/sft-lora", *SHORT, cwd=home, **env))  # fmt: skip
    lora = home / "outputs" / "sft-lora"
    assert (lora / "adapter_config.json").exists() and (lora / "merged" / "config.json").exists()

    # -- preference tuning on the SFT model (dpo.yaml's max_length 1024 follows the model's 128 positions) -----
    pairs = [{"prompt": q, "chosen": " " + a, "rejected": " I do not know."} for q, a in QUESTIONS * 10]
    (home / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = _ok(run("dpo", "--model_name_or_path", "outputs/sft-full", "--train_files", "prefs.jsonl", *SHORT,
                  cwd=home, **env))  # fmt: skip
    dpo = home / "outputs" / "dpo"
    dpo_logs = json.loads((dpo / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/accuracies" in h for h in dpo_logs) and any("eval_rewards/margins" in h for h in dpo_logs)
    assert json.loads((dpo / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]

    # -- evaluate, generate, publish --------------------------------------------------------------------------
    (home / "heldout.txt").write_text(REPO.joinpath("lmkit", "corpus", "tinyshakespeare.txt").read_text()[-3000:])
    out = _ok(run("evaluate", "--model", "outputs/sft-full", "--files", "heldout.txt", cwd=home, **env))
    report = json.loads((sft / "evaluation.json").read_text())
    assert (
        report["loss"] > 0 and abs(report["perplexity"] - 2.718281828 ** report["loss"]) < 1e-3 * report["perplexity"]
    )
    out = _ok(run("generate", "--model", "outputs/sft-chat", "--prompt", "ROMEO:", "--max_new_tokens", "8",
                  "--temperature", "0", cwd=home, **env))  # fmt: skip
    assert "ROMEO:" in out
    # the chat model answers a user turn rendered with its ChatML template (the markers are special: not printed)
    out = _ok(run("generate", "--model", "outputs/sft-chat", "--prompt", "Name a colour.", "--chat", "true",
                  "--max_new_tokens", "8", "--temperature", "0", cwd=home, **env))  # fmt: skip
    assert "user\nName a colour.\nassistant\n" in out and "<|im_start|>" not in out, out[-2000:]
    _ok(run("publish", "--model", "outputs/sft-lora/merged", "--repo_id", "me/tiny-sft", "--dry_run", cwd=home,
            **env))  # fmt: skip
    export = home / "exports" / "tiny-sft"
    assert (export / "README.md").exists()
    # The DPO model's card lists its three stages, oldest first, each with its starting point, data and metrics.
    _ok(run("publish", "--model", "outputs/dpo", "--repo_id", "me/tiny-dpo", "--dry_run", cwd=home, **env))
    card = (home / "exports" / "tiny-dpo" / "README.md").read_text()
    assert "(pretrain -> finetune -> dpo (DPO))" in card, card
    rows = [row for row in card.splitlines() if row.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert [row.split(" | ")[1:4] + row.split(" | ")[4].split()[:1] for row in rows] == [
        ["pretraining", "scratch", "`lmkit's bundled corpus (tinyshakespeare.txt)`", "30"],
        ["supervised fine-tuning (SFT)", "`outputs/pretrain`", "`qa.jsonl`", "6"],
        ["preference tuning, DPO (beta 0.1)", "`outputs/sft-full`", "`prefs.jsonl`", "6"],
    ], card
    assert all("eval_loss " in row for row in rows) and "eval_rewards/accuracies" in rows[2], rows
    assert "perplexity" not in rows[2]  # a preference loss has none

    # -- stock tools read every output: Auto classes + pipeline without lmkit, peft on the adapter ------------
    for folder in (pretrain, pretrain / "checkpoint-30", sft, lora / "merged", dpo, export):
        printed = _load_without_lmkit(
            folder,
            "gen = pipeline('text-generation', model=model, tokenizer=tok)\n"
            "print('GEN', gen('ROMEO:', max_new_tokens=4, do_sample=False)[0]['generated_text'].startswith('ROMEO:'))\n",
        )
        assert "GEN True" in printed, folder
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(sft)
    tuned = PeftModel.from_pretrained(base, lora)  # the adapter fits the base it was trained on
    merged = AutoModelForCausalLM.from_pretrained(lora / "merged")
    ids = AutoTokenizer.from_pretrained(lora)("ROMEO:", return_tensors="pt").input_ids
    # merging is exact up to fp32 rounding of W + BA (stated tolerance: 1e-4 on logits of order 10)
    torch.testing.assert_close(tuned(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
