"""Shared tiny models, CPU training arguments and fixtures for the test suite.

Test modules import the builders (``from conftest import tiny_config``) where a helper function, not a test, needs
them; the fixtures are found by pytest as usual. tests/_tiny_checkpoint.py (a saved checkpoint with its tokenizer)
and tests/_accelerate.py's TINY_PRETRAIN (command-line flags) stay beside this file: they are imported by
subprocesses and recipe tests that do not go through pytest's fixtures.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmkit import LMConfig, LMForCausalLM
from lmkit.args import LMTrainingArguments

VOCAB = 97  # prime: no accidental alignment with block sizes or batch shapes

# 2 layers, 32 wide, grouped-query attention (4 query heads, 2 key/value heads), full logits (no chunked loss),
# token 0 the padding the collators use: a training step in milliseconds on one CPU thread.
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, loss_chunk_size=0, pad_token_id=0,
)  # fmt: skip


def tiny_config(vocab_size: int = VOCAB, **overrides: Any) -> LMConfig:
    """`TINY` as an `LMConfig`; ``overrides`` replace any field (a test that needs another shape says which)."""
    return LMConfig(vocab_size=vocab_size, **{**TINY, **overrides})


def tiny_model(seed: int = 0, vocab_size: int = VOCAB, **overrides: Any) -> LMForCausalLM:
    """A freshly initialised `tiny_config` model; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return LMForCausalLM(tiny_config(vocab_size, **overrides))


def cpu_args(output_dir: Any, **overrides: Any) -> LMTrainingArguments:
    """`LMTrainingArguments` for an in-process CPU test run: fp32, no evaluation, no saving, no reporting, no bars."""
    defaults = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, eval_strategy="no", save_strategy="no",
        disable_tqdm=True, bf16=False,
    )  # fmt: skip
    return LMTrainingArguments(**{**defaults, **overrides})


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared CPU, one thread per test process beats two fighting threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dynamo_env(monkeypatch):
    """ACCELERATE_DYNAMO_BACKEND / _MODE, which a ``torch_compile`` run may export for the whole process, are put
    back as they were after the test."""
    for var in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch
