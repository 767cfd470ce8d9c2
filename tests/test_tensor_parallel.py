"""Tensor parallelism through transformers (``from_pretrained(..., tp_plan="auto")``): lmkit carries Llama's plans, and
a model sharded over 2 CPU processes (gloo) computes what the unsharded model does.

transformers 5.24 shards with DTensor on a device mesh of the current accelerator type, which on a machine without
one is a CPU mesh over gloo: the loader needs no GPU, so the sharded forward, loss, backward and generate are tested
here end to end. ``tp_plan="auto"`` is the older spelling of ``distributed_config=DistributedConfig(tp_plan="auto")``
(transformers turns the one into the other); the worker uses the current one.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import lmkit  # noqa: F401  (registers LMConfig / LMForCausalLM with the Auto classes)
from lmkit.modeling import LMConfig, LMForCausalLM

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
IDS = [[3, 17, 9, 22, 5, 40, 11, 2, 7, 31]]
CHUNK = 4  # fused loss over 10 tokens: chunks of 4, 4, 2, so the recomputing (checkpointed) path runs
NEW_TOKENS = 6

# Runs on every rank under torchrun: loads each folder sharded, records what the parent compares.
WORKER = """
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, DistributedConfig
import lmkit

folders, ids, chunk, new_tokens, out = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
ids = torch.tensor(ids)
record = []
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(
        folder, distributed_config=DistributedConfig(tp_plan="auto"), loss_chunk_size=chunk
    )
    assert type(model) is lmkit.LMForCausalLM and model.tp_size == 2, (type(model), model.tp_size)
    local_shapes = {name: tuple(p.to_local().shape) for name, p in model.named_parameters() if hasattr(p, "to_local")}
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    model.train()
    out_train = model(ids, labels=ids)
    out_train.loss.backward()
    grads = {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach()
        for name, p in model.named_parameters()
    }
    record.append({"local_shapes": local_shapes, "logits": logits, "generated": generated,
                   "loss": out_train.loss.detach(), "train_logits": out_train.logits, "grads": grads})
torch.save(record, os.path.join(out, f"rank{rank}.pt"))
torch.distributed.destroy_process_group()  # as recipes do (lmkit.errors.end_process_group)
"""


def tiny_config(**overrides) -> LMConfig:
    kwargs = dict(
        vocab_size=96,  # even: the vocabulary rows split in two
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # one K/V head per rank
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LMConfig(**{**kwargs, **overrides})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the plans


def test_plans_are_llamas():
    assert LMConfig.base_model_tp_plan == LlamaConfig.base_model_tp_plan
    assert LMConfig.base_model_pp_plan == LlamaConfig.base_model_pp_plan
    assert LMForCausalLM._tp_plan == LlamaForCausalLM._tp_plan == {"lm_head": "colwise_gather_output"}
    assert LMForCausalLM._pp_plan == LlamaForCausalLM._pp_plan


def test_plan_names_the_models_own_modules(tmp_path):
    # transformers merges the config's plan (prefixed with the base model's name), the head's and its own
    # embedding rule; every rule must name a module of the model, or the loader skips it with a warning.
    model = LMForCausalLM(tiny_config())
    assert model.supports_tp_plan and model.supports_pp_plan
    assert model.tp_plan == {
        "model.embed_tokens": "embedding_rowwise",
        **{f"model.{name}": style for name, style in LMConfig.base_model_tp_plan.items()},
        "lm_head": "colwise_gather_output",
    }
    modules = {name for name, _ in model.named_modules()}
    for rule in model.tp_plan:
        assert {rule.replace("*", str(i)) for i in range(2)} <= modules, rule
    model.save_pretrained(tmp_path)  # the plans are class attributes, not part of config.json
    assert not {"base_model_tp_plan", "base_model_pp_plan"} & json.loads((tmp_path / "config.json").read_text()).keys()


# ----------------------------------------------------------------------------- 2 processes, gloo


@pytest.mark.multiprocess
def test_two_rank_cpu_tensor_parallel_equals_one_process(tmp_path):
    """Sharded over 2 gloo ranks, each model gives the single-process logits, greedy tokens, fused chunked loss and
    gradients. Tolerance: assert_close's fp32 defaults (rtol 1.3e-6, atol 1e-5), because o_proj and down_proj
    ("rowwise") each sum two half-width matmuls with an all-reduce, another summation order than one matmul (the
    gap measured is about 1e-7); the greedy tokens are exact."""
    folders, references = [], []
    for name, overrides in {
        "tied": {},
        "untied_mha": {"tie_word_embeddings": False, "num_key_value_heads": 4},
    }.items():
        torch.manual_seed(0)
        model = LMForCausalLM(tiny_config(loss_chunk_size=CHUNK, **overrides))
        model.save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
        ids = torch.tensor(IDS)
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        references.append(
            {"config": model.config, "logits": logits, "generated": generated, "loss": loss, "grads": grads}
        )

    out = tmp_path / "out"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_port", str(_free_port()), str(worker),
           json.dumps([folders, IDS, CHUNK, NEW_TOKENS, str(out)])]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"

    for rank in range(WORLD):
        records = torch.load(out / f"rank{rank}.pt", weights_only=False)
        for ref, got in zip(references, records, strict=True):
            c = ref["config"]
            q_rows, kv_rows = c.num_attention_heads * c.head_dim // WORLD, c.num_key_value_heads * c.head_dim // WORLD
            shapes = got["local_shapes"]
            assert shapes["model.embed_tokens.weight"] == (c.vocab_size // WORLD, c.hidden_size)
            assert shapes["model.layers.0.self_attn.q_proj.weight"] == (q_rows, c.hidden_size)
            assert shapes["model.layers.0.self_attn.k_proj.weight"] == (kv_rows, c.hidden_size)
            assert shapes["model.layers.0.self_attn.o_proj.weight"] == (c.hidden_size, q_rows)
            assert shapes["model.layers.1.mlp.up_proj.weight"] == (c.intermediate_size // WORLD, c.hidden_size)
            assert shapes["model.layers.1.mlp.down_proj.weight"] == (c.hidden_size, c.intermediate_size // WORLD)
            if not c.tie_word_embeddings:
                assert shapes["lm_head.weight"] == (c.vocab_size // WORLD, c.hidden_size)
            assert "model.norm.weight" not in shapes  # replicated

            assert_close(got["logits"], ref["logits"])
            assert torch.equal(got["generated"], ref["generated"])
            assert got["train_logits"] is None  # the fused loss ran: no full logits
            assert_close(got["loss"], ref["loss"])
            assert_close(got["grads"], ref["grads"])
