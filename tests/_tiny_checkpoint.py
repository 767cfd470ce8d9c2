"""A tiny saved lmkit checkpoint for the evaluate / generate / publish tests (built in about a second)."""

import json
import math
from pathlib import Path

import torch

from lmkit import LMConfig, LMForCausalLM
from lmkit.args import LMTrainingArguments
from lmkit.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "lmkit" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:4000]


def make_checkpoint(path: Path, tokenizer: str = "char", max_positions: int = 64, run_files: bool = True):
    """Save a 2-layer lmkit model and its tokenizer to ``path``; with ``run_files``, also the files a training
    run leaves (trainer_state.json with a log history, eval_results.json, training_args.bin)."""
    tok = build_tokenizer(tokenizer, [TEXT], vocab_size=300 if tokenizer == "train" else None)
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=64 * math.ceil(len(tok) / 64), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LMForCausalLM(config).eval()  # a large init: peaked distributions make greedy outputs non-trivial
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if run_files:
        history = [{"step": s, "loss": 4.0 / s**0.3, "learning_rate": 1e-3} for s in (1, 2, 4, 8)]
        history.append({"step": 8, "eval_loss": 3.25, "eval_perplexity": math.exp(3.25)})
        state = {"global_step": 8, "num_input_tokens_seen": 4096, "log_history": history}
        (path / "trainer_state.json").write_text(json.dumps(state))
        (path / "eval_results.json").write_text(json.dumps({"eval_loss": 3.25, "eval_perplexity": math.exp(3.25)}))
        args = LMTrainingArguments(
            output_dir=str(path), report_to="none", use_cpu=True, learning_rate=1e-3, max_steps=8, bf16=False
        )
        torch.save(args, path / "training_args.bin")
    return model, tok
