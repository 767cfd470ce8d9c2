"""The lmkit model: parity with transformers' Llama, the fused chunked loss, save/load, generate, init, config."""

import ast
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM
from transformers.models.llama.modeling_llama import repeat_kv as llama_repeat_kv
from transformers.utils.generic import find_labels

import lmkit  # noqa: F401  (registers LMConfig / LMForCausalLM with the Auto classes)
from lmkit.collator import CausalLMCollator
from lmkit.hub import to_llama
from lmkit.modeling import LMConfig, LMForCausalLM, LMModel
from lmkit.modeling.modeling_lmkit import repeat_kv

VOCAB = 97
MODELING_DIR = Path(__file__).resolve().parent.parent / "lmkit" / "modeling"


def tiny_config(**overrides) -> LMConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LMConfig(**{**kwargs, **overrides})


def tiny_model(**overrides) -> LMForCausalLM:
    torch.manual_seed(0)
    return LMForCausalLM(tiny_config(**overrides))


def llama_twin(model: LMForCausalLM) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM with `model`'s shape and weights: publish.py's conversion (`lmkit.hub.to_llama`)."""
    return to_llama(model).train(model.training)


def batch(seed: int = 1, B: int = 2, T: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a left-padding mask: row 0 has 3 pad positions, row 1 none."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    input_ids[0, :3] = 0
    return input_ids, attention_mask


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_derived_fields():
    config = LMConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        32000,
        128,
        4,
        4,
    )
    assert config.intermediate_size == 384  # 8/3 * 128 = 341.3 -> next multiple of 64
    assert config.num_key_value_heads == 4
    assert config.head_dim == 32
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.tie_word_embeddings is True
    assert config.loss_chunk_size is None  # auto: 2**25 logits per chunk, at least 256 tokens
    assert config.loss_chunk_tokens == 2**25 // config.vocab_size
    assert LMConfig(vocab_size=32000).loss_chunk_tokens == 1048
    assert LMConfig(vocab_size=1_000_000).loss_chunk_tokens == 256
    assert LMConfig(loss_chunk_size=0).loss_chunk_tokens == 0
    assert LMConfig(hidden_size=64, rope_theta=500000.0).rope_parameters["rope_theta"] == 500000.0


def test_config_seed_names_are_aliases():
    config = LMConfig(d_model=64, n_heads=4, n_layers=2, d_ff=256)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.intermediate_size) == (
        64,
        4,
        2,
        256,
    )
    assert (config.d_model, config.n_heads, config.n_layers, config.d_ff) == (64, 4, 2, 256)
    # The default MLP width follows the aliased width, not the default one.
    assert LMConfig(d_model=64).intermediate_size == 192
    assert "d_model" not in config.to_dict()


def test_config_save_load_round_trip(tmp_path):
    config = tiny_config(rope_theta=123.0, loss_chunk_size=7, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    loaded = LMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": 123.0}


def test_loss_chunk_size_is_a_runtime_setting_not_saved(tmp_path):
    # How one run trades memory for recompute is not part of the model: like attn_implementation it stays out of
    # config.json, so a fine-tune or a published model does not inherit it; from_pretrained sets it per load.
    model = tiny_model(loss_chunk_size=7)
    model.save_pretrained(tmp_path)
    assert "loss_chunk_size" not in json.loads((tmp_path / "config.json").read_text())
    assert "loss_chunk_size" not in model.config.to_dict()
    assert model.config.loss_chunk_size == 7  # saving leaves the running model's setting alone
    assert LMForCausalLM.from_pretrained(tmp_path).config.loss_chunk_size is None
    assert LMForCausalLM.from_pretrained(tmp_path, loss_chunk_size=5).config.loss_chunk_tokens == 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 66, "num_attention_heads": 4}, "hidden_size"),
        ({"hidden_size": 60, "num_attention_heads": 4}, "must be even"),  # head_dim 15
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"loss_chunk_size": -1}, "loss_chunk_size"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"rope_theta": 0.0}, "rope_theta"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


# ----------------------------------------------------------------------------- parity with Llama
# Logits are compared exactly (atol=0): lmkit runs the same torch ops as Llama on the same tensor layouts, so any
# CPU takes the same kernels for both. Losses and gradients get assert_close's fp32 defaults (rtol 1.3e-6, atol
# 1e-5) because lmkit computes them differently on purpose: a sum over chunks divided by the target count, fused
# with the LM head in training, against Llama's one mean over full logits.


@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_eager_kv_expansion_is_llamas(n_rep):
    # Same values, strides and (for n_rep 1) storage as Llama's repeat_kv: a contiguous copy of the same values
    # (repeat_interleave) sends the eager matmuls down another kernel on some CPUs, 1e-7 away from Llama.
    kv = torch.randn(2, 9, 2, 16).transpose(1, 2)  # (B, n_kv_heads, S, head_dim), as the attention makes it
    ours, theirs = repeat_kv(kv, n_rep), llama_repeat_kv(kv, n_rep)
    assert torch.equal(ours, theirs)
    assert ours.stride() == theirs.stride()
    assert (ours.data_ptr() == kv.data_ptr()) == (theirs.data_ptr() == kv.data_ptr())


@pytest.mark.parametrize(
    ("num_key_value_heads", "tie_word_embeddings", "attn_implementation"),
    [(4, True, "sdpa"), (2, False, "sdpa"), (4, False, "eager"), (1, True, "eager"), (2, False, "eager")],
)
def test_matches_llama(num_key_value_heads, tie_word_embeddings, attn_implementation):
    model = tiny_model(
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation=attn_implementation,
    ).eval()
    llama = llama_twin(model)
    assert model.config._attn_implementation == llama.config._attn_implementation == attn_implementation
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie_word_embeddings
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    with torch.no_grad():
        assert_close(model(input_ids).logits, llama(input_ids).logits, rtol=0, atol=0)
        ours = model(input_ids, attention_mask=attention_mask, labels=labels)
        theirs = llama(input_ids, attention_mask=attention_mask, labels=labels)
    real = attention_mask.bool()
    assert_close(ours.logits[real], theirs.logits[real], rtol=0, atol=0)
    assert_close(ours.loss, theirs.loss)

    # Training mode: the fused chunked loss and its gradients against Llama's full-logits loss.
    model.train(), llama.train()
    model.config.loss_chunk_size = 4
    ours = model(input_ids, attention_mask=attention_mask, labels=labels)
    theirs = llama(input_ids, attention_mask=attention_mask, labels=labels)
    assert ours.logits is None
    assert_close(ours.loss, theirs.loss)
    ours.loss.backward(), theirs.loss.backward()
    assert_close(grads(model), grads(llama))


def test_matches_llama_with_scaled_rope():
    model = tiny_model(rope_parameters={"rope_type": "linear", "factor": 2.0}).eval()
    llama = llama_twin(model)
    input_ids, _ = batch()
    with torch.no_grad():
        assert_close(model(input_ids).logits, llama(input_ids).logits, rtol=0, atol=0)


def test_weights_are_llama_checkpoint_keys():
    model = tiny_model(num_hidden_layers=1, tie_word_embeddings=False)
    assert sorted(model.state_dict()) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.norm.weight",
    ]
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


# ----------------------------------------------------------------------------- loss


def test_chunked_loss_equals_full_loss_values_and_grads():
    # fp32 defaults throughout: chunk sums and per-chunk LM-head matmuls add up in another order than one mean.
    chunked = tiny_model(loss_chunk_size=5).train()  # 2 x 9 = 18 tokens -> chunks of 5, 5, 5, 3
    full = copy.deepcopy(chunked)
    full.config.loss_chunk_size = 0
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    out_chunked = chunked(input_ids, attention_mask=attention_mask, labels=labels)
    out_full = full(input_ids, attention_mask=attention_mask, labels=labels)
    assert out_chunked.logits is None
    assert out_full.logits.shape == (2, 9, VOCAB)
    assert out_chunked.loss.dtype == torch.float32
    assert_close(out_chunked.loss, out_full.loss)
    out_chunked.loss.backward(), out_full.loss.backward()
    assert_close(grads(chunked), grads(full))

    # Eval mode returns logits even with labels, and the same loss.
    chunked.eval()
    with torch.no_grad():
        out_eval = chunked(input_ids, attention_mask=attention_mask, labels=labels)
    assert out_eval.logits.shape == (2, 9, VOCAB)
    assert_close(out_eval.loss, out_full.loss)


def test_loss_is_fp32_next_token_cross_entropy_in_bf16():
    model = tiny_model(loss_chunk_size=4).to(torch.bfloat16).train()
    input_ids, _ = batch()
    loss = model(input_ids, labels=input_ids).loss
    assert loss.dtype == torch.float32

    model.eval()
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16
    expected = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    assert_close(out.loss, expected)  # the same bf16 logits, upcast: only the fp32 summation order differs
    # Training fuses the LM head over 4-token chunks: a bf16 matmul over 4 rows may round a logit one bf16 step
    # (2**-8 at |logit| < 1) away from the full-batch matmul, depending on the CPU's kernel; cross-entropy moves
    # by at most twice a logit's change.
    assert_close(loss, expected, rtol=0, atol=2 * 2**-8)


@pytest.mark.parametrize("training", [True, False])
def test_collator_targets_are_not_shifted_again(training):
    # The collator's batch carries the targets as both `labels` and `shift_labels`: the model must take
    # `shift_labels` as given. Were `labels` preferred, it would be shifted a second time.
    model = tiny_model(loss_chunk_size=4).train(training)
    seqs, _ = batch()  # (2, 9)
    collated = CausalLMCollator(pad_token_id=0)([{"input_ids": seq} for seq in seqs.tolist()])
    with torch.no_grad():
        loss = model(**collated).loss
        shifted_twice = model(collated["input_ids"], labels=collated["labels"]).loss
        logits = model.eval()(seqs[:, :-1]).logits  # (2, 8, VOCAB)
    # fp32 defaults: in training the loss comes from the fused, chunked LM head rather than these logits.
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))
    assert_close(loss, expected)
    assert not torch.allclose(shifted_twice, expected)


def test_trainer_sees_labels_as_the_only_label_column():
    # shift_labels is a keyword like in LlamaForCausalLM: were it a named parameter, Trainer.prediction_step would
    # require both columns in every batch and report no eval loss for ordinary `labels` batches.
    assert find_labels(LMForCausalLM) == find_labels(LlamaForCausalLM) == ["labels"]


@pytest.mark.parametrize("training", [True, False])
def test_num_items_in_batch_sums_then_divides(training):
    model = tiny_model(loss_chunk_size=4).train(training)
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # 6 + 9 real labels
    n_targets = 6 + 8  # after the shift: the first real label of a row is never a target

    with torch.no_grad():
        mean = model(input_ids, labels=labels).loss
        summed = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss
        over_40 = model(input_ids, labels=labels, num_items_in_batch=40).loss
    # fp32 defaults: a sum divided by n against a mean, and micro-batch against batch matmuls.
    assert_close(summed, mean * n_targets)
    assert_close(over_40, mean * n_targets / 40)

    # Gradient accumulation: micro-batches with different target counts, each divided by the total count, add up
    # to the loss of the whole batch (a per-micro-batch mean would weight row 0's tokens more).
    with torch.no_grad():
        micro = [
            model(input_ids[i : i + 1], labels=labels[i : i + 1], num_items_in_batch=n_targets).loss for i in (0, 1)
        ]
    assert_close(micro[0] + micro[1], mean)


def test_logits_to_keep():
    model = tiny_model().eval()
    input_ids, _ = batch()
    with torch.no_grad():
        full = model(input_ids).logits
        last = model(input_ids, logits_to_keep=1).logits
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(input_ids, labels=input_ids, logits_to_keep=1)
    assert last.shape == (2, 1, VOCAB)
    assert_close(last, full[:, -1:])  # fp32 defaults: the LM head multiplies 2 rows instead of 18


# ----------------------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_the_same_grads():
    model = tiny_model(loss_chunk_size=4).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.model.layers[0].gradient_checkpointing
    input_ids, attention_mask = batch()

    loss = model(input_ids, attention_mask=attention_mask, labels=input_ids).loss
    loss_ckpt = checkpointed(input_ids, attention_mask=attention_mask, labels=input_ids).loss
    assert torch.equal(loss, loss_ckpt)
    loss.backward(), loss_ckpt.backward()
    # Exact: the backward recomputes each layer's forward with the same ops on the same tensors.
    assert_close(grads(model), grads(checkpointed), rtol=0, atol=0)


def test_scaled_residual_init():
    config = tiny_config(hidden_size=64, num_hidden_layers=8, intermediate_size=256, initializer_range=0.02)
    model = LMForCausalLM(config)
    residual_std = 0.02 / math.sqrt(2 * 8)  # 0.005
    for name, param in model.named_parameters():
        std = param.detach().std().item()
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert std == pytest.approx(residual_std, rel=0.05), name
        elif name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert std == pytest.approx(0.02, rel=0.05), name
    assert torch.equal(model.model.embed_tokens.weight[0], torch.zeros(64))  # pad_token_id row


def test_output_hidden_states_and_attentions():
    model = tiny_model(attn_implementation="eager").eval()
    input_ids, _ = batch()
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    assert [a.shape for a in out.attentions] == [(2, 4, 9, 9)] * 2


# ----------------------------------------------------------------------------- save / load / generate


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_save_pretrained_round_trip(tmp_path, tie_word_embeddings):
    model = tiny_model(tie_word_embeddings=tie_word_embeddings).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "pytorch_model.bin").exists()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LMForCausalLM
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie_word_embeddings
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    input_ids, attention_mask = batch()
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids, attention_mask=attention_mask).logits,
            model(input_ids, attention_mask=attention_mask).logits,
        )


def test_auto_model_loads_the_decoder_of_a_causal_lm_folder(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    decoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(decoder) is LMModel
    input_ids, attention_mask = batch()
    with torch.no_grad():
        hidden = decoder(input_ids, attention_mask=attention_mask).last_hidden_state
        expected = model.model(input_ids, attention_mask=attention_mask).last_hidden_state
    assert torch.equal(hidden, expected)


def test_auto_model_loads_the_decoder_as_remote_code_without_lmkit(tmp_path):
    # What the auto_map's AutoModel entry is for: a stock install loads the decoder of a published causal-LM folder.
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "model")
    script = """
import importlib.abc, sys
import torch
from transformers import AutoModel

class NoLmkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lmkit":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, NoLmkit())
folder, out = sys.argv[1:]
decoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(decoder).__name__ == "LMModel", type(decoder)
assert type(decoder).__module__.startswith("transformers_modules."), type(decoder).__module__
with torch.no_grad():
    torch.save(decoder(torch.arange(1, 9)[None]).last_hidden_state, out)
"""
    out = tmp_path / "hidden.pt"
    cmd = [sys.executable, "-I", "-c", script, str(tmp_path / "model"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        expected = model.model(torch.arange(1, 9)[None]).last_hidden_state
    assert torch.equal(torch.load(out), expected)


def test_generate_with_cache_equals_without_and_matches_llama():
    model = tiny_model().eval()
    llama = llama_twin(model)
    input_ids, attention_mask = batch(T=6)
    settings = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0)

    with_cache = model.generate(input_ids, **settings)
    without_cache = model.generate(input_ids, use_cache=False, **settings)
    from_llama = llama.generate(input_ids, **settings)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache[:, :6], input_ids)
    assert torch.equal(with_cache, without_cache)
    assert torch.equal(with_cache, from_llama)


def test_cache_step_equals_full_forward():
    model = tiny_model().eval()
    input_ids, _ = batch()
    with torch.no_grad():
        full = model(input_ids).logits
        prefix = model(input_ids[:, :-1], use_cache=True)
        step = model(input_ids[:, -1:], cache=prefix.cache)
        with pytest.warns(FutureWarning, match="past_key_values"):  # transformers 5's old name still works
            legacy_name = model(input_ids[:, -1:], past_key_values=model(input_ids[:, :-1]).cache)
    # fp32 defaults: one query row against a cached K/V is a different matmul shape than the full forward.
    assert_close(step.logits[:, 0], full[:, -1])
    assert_close(legacy_name.logits[:, 0], full[:, -1])


# ----------------------------------------------------------------------------- remote code


def test_model_files_import_only_torch_and_transformers():
    for path in (MODELING_DIR / "configuration_lmkit.py", MODELING_DIR / "modeling_lmkit.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the sibling configuration module
                    assert node.module == "configuration_lmkit", path.name
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers"} | sys.stdlib_module_names, (path.name, roots)


def test_save_pretrained_ships_the_model_files_with_auto_map(tmp_path):
    # Importing lmkit registers the classes for saving; tests/test_stock_tools.py loads such folders without lmkit.
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lmkit.LMConfig",
        "AutoModel": "modeling_lmkit.LMModel",  # the decoder alone, which transformers would not name by itself
        "AutoModelForCausalLM": "modeling_lmkit.LMForCausalLM",
    }
    for name in ("configuration_lmkit.py", "modeling_lmkit.py"):
        assert (tmp_path / name).read_bytes() == (MODELING_DIR / name).read_bytes(), name


def test_importing_lmkit_only_registers_the_model():
    # transformers' modeling code is imported first: on first import it sets TORCHINDUCTOR_CACHE_DIR and warning
    # filters itself, which would otherwise be charged to lmkit.
    script = """
import logging, os, sys, warnings
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel, GenerationMixin  # their effects
before = (dict(os.environ), torch.get_num_threads(), list(logging.getLogger().handlers), list(warnings.filters))
modules = set(sys.modules)
import lmkit
loaded = sorted(m for m in set(sys.modules) - modules if m.startswith("lmkit"))
assert loaded == ["lmkit", "lmkit.modeling", "lmkit.modeling.configuration_lmkit", "lmkit.modeling.modeling_lmkit"], loaded
after = (dict(os.environ), torch.get_num_threads(), list(logging.getLogger().handlers), list(warnings.filters))
assert after == before
assert AutoConfig.for_model("lmkit").__class__ is lmkit.LMConfig
assert AutoModel._model_mapping[lmkit.LMConfig] is lmkit.modeling.LMModel
assert AutoModelForCausalLM._model_mapping[lmkit.LMConfig] is lmkit.LMForCausalLM
auto_classes = (lmkit.LMConfig._auto_class, lmkit.modeling.LMModel._auto_class, lmkit.LMForCausalLM._auto_class)
assert auto_classes == ("AutoConfig", "AutoModel", "AutoModelForCausalLM"), auto_classes
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation).train()  # training: no cache, so packing is seen
    first, second = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12, 13]])
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        out = model(packed, position_ids=position_ids)
        assert out.cache is None
        # fp32 defaults: a masked 9-token attention against unmasked 5- and 4-token ones (another kernel for sdpa).
        assert_close(out.logits[:, :5], model(first).logits)
        assert_close(out.logits[:, 5:], model(second).logits)
