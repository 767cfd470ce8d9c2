"""recipes/finetune.py end to end on tiny models the tests build: learning, LoRA, merge, resume, bad input."""

import itertools
import json
import logging
import math
import os
import random
from pathlib import Path

import pytest
import torch
from _recipes import load_recipe
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from lmkit import LMConfig, LMForCausalLM
from lmkit.args import LMTrainingArguments
from lmkit.collator import CausalLMCollator
from lmkit.finetune import DROPOUT_LEVELS, CPUDropout, add_tokens, apply_lora, load_model, load_tokenizer
from lmkit.finetune_args import FinetuneArguments
from lmkit.sft import build_sft_dataset
from lmkit.tokenizer import build_tokenizer
from lmkit.trainer import LMTrainer

finetune = load_recipe("finetune")

REPO = Path(__file__).resolve().parent.parent
ALPHABET = "abcdefghijklmnopqrstuvwxyz\n: "
LETTERS = "abcdefg"
QUIET = ["--report_to", "none", "--use_cpu", "true", "--bf16", "false", "--disable_tqdm", "true"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared


def char_tokenizer():
    return build_tokenizer("char", [ALPHABET])  # 32 tokens: 29 characters, eos, pad, unk


@pytest.fixture(scope="module")
def lmkit_base(tmp_path_factory):
    """An untrained tiny lmkit model (64 embedding rows: a pretrain run rounds the vocab up) and its tokenizer."""
    path = tmp_path_factory.mktemp("lmkit-base")
    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LMConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    LMForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_hf_model(path: Path, kind: str, vocab_size: int | None = None) -> Path:
    tok = char_tokenizer()
    vocab_size = vocab_size or len(tok)
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False, eos_token_id=tok.eos_token_id)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # fmt: skip
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reversal_task() -> tuple[list[str], list[str]]:
    words = ["".join(p) for p in itertools.product(LETTERS, repeat=3)]  # 343 words
    random.Random(0).shuffle(words)
    return words[40:], words[:40]  # train, held out


def reversal_rows(words):
    return [{"prompt": f"reverse: {w}\n", "completion": w[::-1]} for w in words]


def chat_rows(words):
    return [
        {"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
        for w in words
    ]


def reverse(word: str) -> str:
    return word[::-1]


def rotate(word: str) -> str:
    return word[1:] + word[0]


def exact_match(model_dir: Path, words: list[str], answer=reverse) -> float:
    """Greedy generate() on held-out "reverse: w" prompts; the decoded answer must equal ``answer(w)`` exactly."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    hits = 0
    for w in words:
        inputs = tok(f"reverse: {w}\n", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        hits += tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == answer(w)
    return hits / len(words)


def run(*argv: str) -> dict:
    return finetune.main([*map(str, argv), *QUIET])


# -- learning ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reverser(lmkit_base, tmp_path_factory):
    """The untrained base fully fine-tuned on reversal (trained once, shared): exact match before/after, dir."""
    tmp_path = tmp_path_factory.mktemp("reverser")
    train, held_out = reversal_task()
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(train))
    before = exact_match(lmkit_base, held_out, reverse)
    metrics = run(
        "--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / "out",
        "--block_size", 32, "--max_steps", 250, "--learning_rate", 3e-3, "--warmup_steps", 0.05,
        "--per_device_train_batch_size", 32, "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", 50,
    )  # fmt: skip
    return before, metrics, tmp_path / "out"


def test_full_finetune_learns_to_reverse_held_out_words(reverser):
    before, metrics, out = reverser
    _, held_out = reversal_task()
    after = exact_match(out, held_out, reverse)
    print(f"reversal exact match on {len(held_out)} held-out words: before {before:.2f}, after {after:.2f}")
    assert before <= 0.05
    assert after >= 0.6
    assert metrics["train_loss"] < 1.0


def test_cpu_dropout_drops_p_scales_the_rest_and_reproduces_from_the_seed():
    """LoRA's CPU dropout: each element dropped with p (rounded to 2**-16), the kept ones scaled so the mean is kept,
    the gradient through the same mask, and the mask drawn from torch's seed."""
    n, p = 1_000_000, 0.05
    cutoff = round(p * DROPOUT_LEVELS)  # 3277: p = 0.0500031
    scale = DROPOUT_LEVELS / (DROPOUT_LEVELS - cutoff)
    dropout = CPUDropout(p).train()
    x = torch.ones(n, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    assert set(y.unique().tolist()) == {0.0, torch.tensor(scale).item()}  # the scale, rounded to fp32
    sigma = math.sqrt(p * (1 - p) / n)  # binomial spread of the dropped fraction
    assert abs((y == 0).double().mean().item() - cutoff / DROPOUT_LEVELS) < 5 * sigma
    assert abs(y.double().mean().item() - 1.0) < 5 * sigma * scale  # E[y] = x exactly with this scale
    assert abs((y[: n // 2] == 0).double().mean().item() - p) < 5 * sigma * math.sqrt(2)  # no drift along the input
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach(), rtol=0, atol=0)  # d(sum y)/dx = the scaled mask itself
    torch.manual_seed(0)
    torch.testing.assert_close(dropout(x), y, rtol=0, atol=0)
    assert not torch.equal(dropout(x), y)  # the next call draws the next mask
    assert torch.equal(dropout.eval()(x), x)


def test_cpu_dropout_under_torch_compile_is_one_graph():
    """Compiled, the module is nn.Dropout (inductor draws the mask): no numpy call to break the graph."""
    from lmkit.perf import have_cpp_compiler

    if not have_cpp_compiler():
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    dropout = CPUDropout(0.5).train()
    y = torch.compile(lambda x: dropout(x) * 2, fullgraph=True)(torch.ones(10_000))  # raises on a graph break
    assert set(y.unique().tolist()) == {0.0, 4.0}
    assert abs((y == 0).double().mean().item() - 0.5) < 5 * 0.005  # 5 sigma of a binomial fraction at n = 10,000


def test_lora_layers_get_the_cpu_dropout_and_no_dropout_stays_none(lmkit_base):
    for p, kind in ((0.1, CPUDropout), (0.0, torch.nn.Identity)):
        model = apply_lora(load_model(str(lmkit_base)), FinetuneArguments(use_lora=True, lora_dropout=p))
        layers = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
        assert len(layers) == 2 * 7 and all(type(d) is kind for d in layers)  # q k v o gate up down, 2 blocks
        assert all(d.p == p for d in layers if kind is CPUDropout)
        assert not any("dropout" in key for key in model.state_dict())  # nothing new in what peft saves


def test_lora_learns_a_new_task_on_a_trained_base(reverser, tmp_path):
    # LoRA on a random tiny model barely moves (its frozen 0.02-std embeddings cap the logits), so the base here
    # is the trained reverser, and the adapter must teach it a different answer to the same prompt: rotate left.
    _, _, base = reverser
    train, held_out = reversal_task()
    before = exact_match(base, held_out, rotate)
    data = write_jsonl(
        tmp_path / "rotate.jsonl", [{"prompt": f"reverse: {w}\n", "completion": rotate(w)} for w in train]
    )
    run(
        "--model_name_or_path", base, "--train_files", data, "--output_dir", tmp_path / "out", "--use_lora", "true",
        "--merge_lora", "true", "--lora_r", 16, "--lora_alpha", 32, "--lora_dropout", 0.0, "--block_size", 32,
        "--max_steps", 150, "--learning_rate", 1e-2, "--per_device_train_batch_size", 32, "--eval_strategy", "no",
        "--save_strategy", "no",
    )  # fmt: skip
    after = exact_match(tmp_path / "out" / "merged", held_out, rotate)
    print(f"LoRA rotate exact match on {len(held_out)} held-out words: before {before:.2f}, after {after:.2f}")
    assert before <= 0.25  # words ending in a double letter ("abb") rotate and reverse alike: about 1 in 7
    assert after >= 0.8
    assert exact_match(base, held_out, reverse) >= 0.6  # the base model's own files were not touched


# -- LoRA -------------------------------------------------------------------------------------------------------


class FirstStepGrads(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_lora_with_checkpointing_trains_adapters_and_leaves_base_untouched(lmkit_base, tmp_path, use_reentrant):
    tok, n_saved = load_tokenizer(str(lmkit_base))
    model = load_model(str(lmkit_base))
    add_tokens(model, tok, n_saved, [])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = apply_lora(model, FinetuneArguments(use_lora=True, lora_dropout=0.0), activation_checkpointing=True)
    train, _ = reversal_task()
    args = LMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, eval_strategy="no", save_strategy="no",
        disable_tqdm=True, max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=0, bf16=False,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )  # fmt: skip
    catcher = FirstStepGrads(model)
    trainer = LMTrainer(
        model=model, args=args, train_dataset=build_sft_dataset(reversal_rows(train[:64]), tok, 32),
        data_collator=CausalLMCollator(pad_token_id=tok.pad_token_id), callbacks=[catcher],
    )  # fmt: skip
    trainer.train()
    assert model.base_model.model.model.layers[0].gradient_checkpointing  # the layers really were checkpointed
    lora_b = {n: g for n, g in catcher.grads.items() if "lora_B" in n}
    assert len(lora_b) == 2 * 7  # every linear layer of both blocks (q k v o gate up down), not the LM head
    assert all(g.abs().sum() > 0 for g in lora_b.values()), "no gradient reached some adapters"
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(param, base[original], rtol=0, atol=0, msg=f"{name} changed")


def test_lora_chat_on_llama_adds_markers_saves_adapter_and_merges(tmp_path):
    base_dir = save_hf_model(tmp_path / "llama", "llama")  # 32-token vocab: the ChatML markers need new rows
    train, _ = reversal_task()
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(train[:48]))
    out = tmp_path / "out"
    run(
        "--model_name_or_path", base_dir, "--train_files", data, "--output_dir", out, "--use_lora", "true",
        "--merge_lora", "true", "--packing", "true", "--activation_checkpointing", "true", "--block_size", 64,
        "--max_steps", 4, "--learning_rate", 1e-2, "--per_device_train_batch_size", 4, "--save_strategy", "no",
        "--eval_strategy", "no",
    )  # fmt: skip
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 34 and tok.convert_tokens_to_ids("<|im_end|>") == 33
    assert "<|im_start|>" in tok.chat_template
    assert load_file(base_dir / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 32  # base untouched

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.get_input_embeddings().num_embeddings == 34  # resized, new rows trained through the adapter
    assert 33 in merged.generation_config.eos_token_id  # generation stops at the end-of-turn marker

    from peft import PeftModel

    base_tok, n_saved = load_tokenizer(str(base_dir))
    base = load_model(str(base_dir))
    add_tokens(base, base_tok, n_saved, ["<|im_start|>", "<|im_end|>"])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "reverse abc"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()
        adapter_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter did learn something


# -- starting points, text, resume ------------------------------------------------------------------------------


def test_gpt2_folder_full_finetune(tmp_path):
    base_dir = save_hf_model(tmp_path / "gpt2", "gpt2")
    train, _ = reversal_task()
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(train[:32]))
    metrics = run(
        "--model_name_or_path", base_dir, "--train_files", data, "--output_dir", tmp_path / "out", "--block_size", 32,
        "--max_steps", 3, "--per_device_train_batch_size", 8, "--save_strategy", "no", "--eval_strategy", "no",
    )  # fmt: skip
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "gpt2"
    tuned, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert tuned.keys() == base.keys() and not torch.equal(
        tuned["transformer.wte.weight"], base["transformer.wte.weight"]
    )
    # --eval_strategy no: no evaluation during training, and none at the end either
    assert "eval_loss" not in metrics and not (tmp_path / "out" / "eval_results.json").exists()
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert not [entry for entry in history if "eval_loss" in entry]


def test_text_files_continue_pretraining(lmkit_base, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"the {w} is a word" for w in reversal_task()[0][:200]))
    run(
        "--model_name_or_path", lmkit_base, "--train_files", tmp_path / "corpus.txt", "--output_dir", tmp_path / "out",
        "--block_size", 32, "--max_steps", 3, "--per_device_train_batch_size", 4, "--save_strategy", "no",
        "--eval_strategy", "no",
    )  # fmt: skip
    # Text is packed into full blocks as in pretraining (SFT rows would be padded): 3 steps x 4 rows x 32 tokens.
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == 3 * 4 * 32
    tuned, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(lmkit_base / "model.safetensors")
    assert tuned.keys() == base.keys()
    assert not torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # it trained


def test_resume_auto_and_start_from_checkpoint_n(lmkit_base, tmp_path):
    train, _ = reversal_task()
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(train[:64]))
    out = tmp_path / "out"
    common = ["--train_files", data, "--block_size", 32, "--per_device_train_batch_size", 8, "--eval_strategy", "no",
              "--save_steps", 2]  # fmt: skip
    run("--model_name_or_path", lmkit_base, "--output_dir", out, "--max_steps", 2, *common)
    assert (out / "checkpoint-2" / "config.json").is_file()
    run("--model_name_or_path", lmkit_base, "--output_dir", out, "--max_steps", 4, "--resume_from_checkpoint", "auto",
        *common)  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (out / "checkpoint-4").is_dir()
    # A checkpoint-N folder is a starting point of its own (model and tokenizer inside).
    run("--model_name_or_path", out / "checkpoint-4", "--output_dir", tmp_path / "again", "--max_steps", 1, *common)
    assert (tmp_path / "again" / "model.safetensors").is_file()


# -- defaults that follow the model and the data ---------------------------------------------------------------


def test_default_block_size_follows_the_model_and_the_report_shows_the_loaded_model(lmkit_base, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(reversal_task()[0][:16]))
    with caplog.at_level(logging.INFO, logger="lmkit"):
        run("--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / "out",
            "--max_steps", 1, "--per_device_train_batch_size", 4, "--save_strategy", "no")  # fmt: skip
    lines = [r.getMessage() for r in caplog.records]
    # sft-full.yaml's block_size 512 is the recipe's default, not the user's: it follows the model's 64 positions
    assert (
        "--block_size 512 (a default) exceeds the model's max_position_embeddings 64: using --block_size 64" in lines
    )
    loaded = [line for line in lines if line.startswith("LoadedModel: ")]
    assert loaded == [
        f"LoadedModel: {{'model_name_or_path': '{lmkit_base}', 'model_type': 'lmkit', 'vocab_size': 64, "
        "'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2, 'num_attention_heads': 4, "
        "'num_key_value_heads': 4, 'max_position_embeddings': 64, 'attn_implementation': 'auto', "
        "'trust_remote_code': False}"
    ]
    assert not [line for line in lines if line.startswith("ModelArguments: ")]  # the from-scratch shape is not shown


@pytest.mark.parametrize("where", ["command line", "user config"])
def test_explicit_block_size_over_the_model_is_an_error(lmkit_base, tmp_path, capsys, where):
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(["abc", "bcd", "cde"]))
    if where == "command line":
        flags = ["--block_size", 512]
    else:
        (tmp_path / "mine.yaml").write_text("block_size: 512\nmax_steps: 1\n")
        flags = ["--config", tmp_path / "mine.yaml"]
    with pytest.raises(SystemExit) as exit_info:
        run("--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / "out", *flags)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == "lmkit: error: --block_size 512 exceeds the model's max_position_embeddings 64"


def test_validation_split_0_trains_without_evaluation(lmkit_base, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(reversal_task()[0][:16]))
    with caplog.at_level(logging.INFO, logger="lmkit"):
        metrics = run(
            "--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / "out",
            "--validation_split", 0, "--block_size", 32, "--max_steps", 2, "--eval_steps", 1,
            "--per_device_train_batch_size", 4, "--save_strategy", "no",
        )  # fmt: skip
    assert "--validation_split 0.0 holds out no validation data: no evaluation (--eval_strategy no)" in caplog.messages
    assert "eval_loss" not in metrics
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2  # every step asked
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_validation_split_0_with_evaluation_asked_for_is_an_error(lmkit_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(["abc", "bcd", "cde"]))
    with pytest.raises(SystemExit):
        run("--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / "out",
            "--validation_split", 0, "--eval_strategy", "steps", "--block_size", 32)  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lmkit: error: --eval_strategy steps: --validation_split 0.0 holds out no validation data, so there is "
        "nothing to evaluate"
    )


def test_lora_runs_reproduce_exactly(lmkit_base, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(reversal_task()[0][:32]))
    results = []
    for name in ("a", "b"):
        torch.randn(100)  # whatever the global RNG did before, the run draws from its --seed
        metrics = run(
            "--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / name,
            "--use_lora", "true", "--lora_dropout", 0.1, "--block_size", 32, "--max_steps", 3,
            "--learning_rate", 1e-2, "--per_device_train_batch_size", 8, "--save_strategy", "no",
            "--eval_strategy", "no", "--logging_steps", 1,
        )  # fmt: skip
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        results.append((metrics["train_loss"], [h["loss"] for h in history if "loss" in h],
                        load_file(tmp_path / name / "adapter_model.safetensors")))  # fmt: skip
    (loss_a, steps_a, adapter_a), (loss_b, steps_b, adapter_b) = results
    assert len(steps_a) == 3 and steps_a == steps_b and loss_a == loss_b
    assert adapter_a.keys() == adapter_b.keys() and any("lora_A" in k for k in adapter_a)
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key], rtol=0, atol=0, msg=key)


# -- streaming --------------------------------------------------------------------------------------------------


@pytest.fixture
def collated(monkeypatch) -> list[dict]:
    """Every batch the recipe's CausalLMCollator builds during the test, in order."""
    batches: list[dict] = []
    collate = CausalLMCollator.__call__

    def recording(self, features):
        batches.append(collate(self, features))
        return batches[-1]

    monkeypatch.setattr(CausalLMCollator, "__call__", recording)
    return batches


def _first_batches(base: Path, rows: list[dict], n_batches: int, batch_size: int, width: int | None) -> list[dict]:
    """What the map-style path feeds for ``rows`` (unshuffled): its first batches, as the recipe collates them."""
    tok, _ = load_tokenizer(str(base))
    ds = build_sft_dataset(rows, tok, 32)
    collate = CausalLMCollator(pad_token_id=tok.pad_token_id, pad_to_length=width)
    return [collate([ds[i] for i in range(b * batch_size, (b + 1) * batch_size)]) for b in range(n_batches)]


def test_streaming_sft_first_batch_and_loss_equal_the_map_style_path(lmkit_base, tmp_path, collated):
    train, held_out = reversal_task()
    rows = reversal_rows(train[:64])
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", reversal_rows(held_out[:8]))
    run(
        "--model_name_or_path", lmkit_base, "--train_files", data, "--validation_files", val, "--streaming", "true",
        "--output_dir", tmp_path / "out", "--block_size", 32, "--max_steps", 2, "--per_device_train_batch_size", 8,
        "--logging_steps", 1, "--eval_strategy", "no", "--save_strategy", "no", "--learning_rate", 1e-3,
    )  # fmt: skip
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    first_loss = history[0]["loss"]

    (expected,) = _first_batches(lmkit_base, rows, 1, 8, width=None)  # padded to the batch's longest row
    streamed = collated[0]  # padded to --block_size: every streamed batch has one shape
    n = expected["input_ids"].shape[1]
    assert streamed["input_ids"].shape == (8, 32) and n < 32
    assert streamed["input_ids"][:, :n].tolist() == expected["input_ids"].tolist()
    assert streamed["shift_labels"][:, :n].tolist() == expected["shift_labels"].tolist()
    assert (streamed["shift_labels"][:, n:] == -100).all() and (streamed["attention_mask"][:, n:] == 0).all()
    model = load_model(str(lmkit_base)).eval()
    with torch.no_grad():
        loss = model(**expected).loss.item()  # the base model on the map-style batch: the stream's step-1 loss
    torch.testing.assert_close(first_loss, loss, rtol=1e-5, atol=0)


def test_unpacked_batches_are_padded_to_a_multiple_of_16_by_default(lmkit_base, tmp_path, collated):
    words = [(LETTERS * 2)[: 1 + (i * 5) % 14] for i in range(32)]  # 1-14 letters: rows of 13-39 tokens
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(words))
    common = ("--model_name_or_path", lmkit_base, "--train_files", data, "--block_size", 40, "--max_steps", 2,
              "--per_device_train_batch_size", 4, "--eval_strategy", "no", "--save_strategy", "no")  # fmt: skip
    widths = {}
    for name, extra in {"default": (), "off": ("--pad_to_multiple_of", 1), "packed": ("--packing", "true")}.items():
        collated.clear()
        run(*common, *extra, "--output_dir", tmp_path / name)
        widths[name] = [batch["input_ids"].shape[1] for batch in collated]
    assert widths["default"] and all(w % 16 == 0 for w in widths["default"])
    assert any(w % 16 for w in widths["off"])  # each batch's longest row
    assert set(widths["packed"]) == {40}  # packed rows keep --block_size, not rounded to 48


def test_streaming_packed_chat_on_llama_adds_markers(tmp_path, collated):
    base_dir = save_hf_model(tmp_path / "llama", "llama")  # 32-token vocab: the ChatML markers are new tokens
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(reversal_task()[0][:48]))
    metrics = run(
        "--model_name_or_path", base_dir, "--train_files", data, "--output_dir", tmp_path / "out", "--streaming",
        "true", "--packing", "true", "--block_size", 64, "--max_steps", 2, "--per_device_train_batch_size", 2,
        "--save_strategy", "no", "--eval_strategy", "no",
    )  # fmt: skip
    assert math.isfinite(metrics["train_loss"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert start == 32
    first = collated[0]
    assert first["input_ids"].shape == (2, 64) and "attention_mask" not in first  # packed rows: one length
    # One 36-token conversation per row of 64 + 1 (two do not fit), rendered with the new markers, then padding.
    for row, word in zip(first["input_ids"].tolist(), reversal_task()[0][:2], strict=True):
        chat = f"<|im_start|>user\nreverse {word}<|im_end|>\n<|im_start|>assistant\n{word[::-1]}<|im_end|>\n"
        assert tok.decode(row[:36]) == chat + "<|endoftext|>"
        assert row[36:] == [tok.pad_token_id] * 28


def test_streaming_text_continues_pretraining(lmkit_base, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"the {w} is a word" for w in reversal_task()[0][:200]))
    metrics = run(
        "--model_name_or_path", lmkit_base, "--train_files", tmp_path / "corpus.txt", "--streaming", "true",
        "--output_dir", tmp_path / "out", "--block_size", 32, "--max_steps", 3, "--save_strategy", "no",
        "--eval_strategy", "no", "--per_device_train_batch_size", 4,
    )  # fmt: skip
    assert math.isfinite(metrics["train_loss"]) and (tmp_path / "out" / "model.safetensors").is_file()


def test_streaming_without_max_steps_is_one_line(lmkit_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(["abc", "bcd", "cde"]))
    with pytest.raises(SystemExit):
        run("--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / "out",
            "--streaming", "true", "--block_size", 32)  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lmkit: error: --streaming needs --max_steps: a stream has no length to count epochs by"
    )


@pytest.mark.multiprocess
def test_two_processes_stream_disjoint_sft_rows(lmkit_base, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): rank 0 reads the stream and each rank trains on its half of every
    global batch, so the ranks' rows are disjoint and together are the stream's rows in order."""
    import socket
    import subprocess
    import sys

    rows = reversal_rows(reversal_task()[0][:64])
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    record = tmp_path / "record"
    record.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "accelerate_configs" / "cpu.yaml",
        "--num_processes", 2, "--main_process_port", port, REPO / "tests" / "_launch_finetune.py",
        "--model_name_or_path", lmkit_base, "--train_files", data, "--validation_split", 0, "--streaming", "true",
        "--output_dir", tmp_path / "out", "--block_size", 32, "--max_steps", 3, "--per_device_train_batch_size", 4,
        "--save_strategy", "no", *QUIET,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", LMKIT_TEST_RECORD=str(record))
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seen = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    # One step = 2 x 4 rows: the stream's rows 8k..8k+3 go to rank 0, 8k+4..8k+7 to rank 1.
    expected = [[ids, targets] for batch in _first_batches(lmkit_base, rows, 6, 4, width=32)
                for ids, targets in zip(batch["input_ids"].tolist(), batch["shift_labels"].tolist(), strict=True)]  # fmt: skip
    assert seen[0] == [row for b in (0, 2, 4) for row in expected[4 * b : 4 * b + 4]]
    assert seen[1] == [row for b in (1, 3, 5) for row in expected[4 * b : 4 * b + 4]]
    assert not {json.dumps(r) for r in seen[0]} & {json.dumps(r) for r in seen[1]}


# -- bad input --------------------------------------------------------------------------------------------------


def _bad_cases(tmp: Path, lmkit_base: Path) -> dict[str, tuple[list, str]]:
    good = write_jsonl(tmp / "good.jsonl", reversal_rows(["abc", "bcd", "cde"]))
    missing = write_jsonl(tmp / "missing.jsonl", [*reversal_rows(["abc", "bcd"]), {"prompt": "x"}])
    role = write_jsonl(
        tmp / "role.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}]
    )
    (tmp / "empty-ckpt").mkdir()
    mismatch = save_hf_model(tmp / "mismatch", "llama", vocab_size=16)  # its tokenizer has 32 tokens
    return {
        "no-config": (["--model_name_or_path", tmp / "empty-ckpt", "--train_files", good], "no config.json"),
        "vocab-mismatch": (
            ["--model_name_or_path", mismatch, "--train_files", good],
            "the tokenizer has 32 tokens but the model's embedding has only 16 rows",
        ),
        "missing-completion": (
            ["--model_name_or_path", lmkit_base, "--train_files", missing],
            "missing.jsonl:3: no 'completion' field",
        ),
        "unknown-role": (
            ["--model_name_or_path", lmkit_base, "--train_files", role],
            "role.jsonl:1: message 1 has unknown role 'robot'",
        ),
        "lora-targets": (
            [
                "--model_name_or_path",
                lmkit_base,
                "--train_files",
                good,
                "--use_lora",
                "true",
                "--lora_target_modules",
                "qkv",
                "q_proj",
            ],
            "--lora_target_modules qkv: no such module in the model; its linear layers are down_proj, gate_proj, "
            "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),  # fmt: skip
        "pad-multiple": (
            ["--model_name_or_path", lmkit_base, "--train_files", good, "--pad_to_multiple_of", "0"],
            "--pad_to_multiple_of must be a positive integer, got 0",
        ),
        "qlora-on-cpu": (
            ["--model_name_or_path", lmkit_base, "--train_files", good, "--load_in_4bit", "true"],
            "--load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes",
        ),
    }


CASES = ["no-config", "vocab-mismatch", "missing-completion", "unknown-role", "lora-targets", "pad-multiple", "qlora-on-cpu"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(lmkit_base, tmp_path, capsys, case):
    if case == "qlora-on-cpu" and torch.cuda.is_available():
        pytest.skip("a CUDA machine can run QLoRA")
    argv, message = _bad_cases(tmp_path, lmkit_base)[case]
    out = tmp_path / "out"
    capsys.readouterr()  # drop what building the fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        run(*argv, "--output_dir", out, "--block_size", 32)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' load progress bar may precede it)
    assert last_line.startswith("lmkit: error: ")
    assert message in last_line
    assert not out.exists()


def test_finished_output_dir_is_not_overwritten(lmkit_base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    data = write_jsonl(tmp_path / "good.jsonl", reversal_rows(["abc", "bcd", "cde"]))
    with pytest.raises(SystemExit):
        run("--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", out)
    assert "already holds a finished model" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


# -- prepare_model: the starting model of finetune.py, dpo.py and merge_lora --------------------------------------


def test_prepare_model_adds_mean_rows_the_stop_marker_and_adapters(tmp_path):
    import re

    from lmkit.finetune import prepare_model
    from lmkit.sft import resolve_chat_template

    base_dir = str(save_hf_model(tmp_path / "llama", "llama"))  # 32 rows, untied head
    tokenizer, n_saved = load_tokenizer(base_dir)
    tokenizer.chat_template, new_special = resolve_chat_template(None, tokenizer)  # lmkit's ChatML file
    assert (n_saved, new_special) == (32, ["<|im_start|>", "<|im_end|>"])
    model, new_ids = prepare_model(base_dir, tokenizer, n_saved, new_special, chat=True)
    assert new_ids == [32, 33] and tokenizer.convert_tokens_to_ids(new_special) == [32, 33]
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.shape == (34, 32)
        mean = weight[:32].mean(dim=0)
        assert torch.equal(weight[32], mean) and torch.equal(weight[33], mean)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, 33]  # stops at <|im_end|> too

    plain, _ = prepare_model(base_dir, *load_tokenizer(base_dir), [])  # no chat: nothing added, EOS alone stops
    assert plain.get_input_embeddings().num_embeddings == 32
    assert plain.generation_config.eos_token_id == tokenizer.eos_token_id

    tokenizer, n_saved = load_tokenizer(base_dir)
    lora = FinetuneArguments(use_lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    adapted, new_ids = prepare_model(base_dir, tokenizer, n_saved, new_special, lora=lora)
    trainable = {re.sub(r"\.\d+\.", ".N.", n) for n, p in adapted.named_parameters() if p.requires_grad}
    assert new_ids == [32, 33]
    assert trainable == {  # the adapters, and the new tokens' embedding rows
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        *(f"base_model.model.model.layers.N.self_attn.{m}.lora_{ab}.default.weight" for m in ("q_proj", "v_proj")
          for ab in "AB"),
    }  # fmt: skip


def test_prepare_model_refuses_a_tokenizer_bigger_than_the_embedding(tmp_path):
    from lmkit.errors import LMKitError
    from lmkit.finetune import prepare_model

    small = str(save_hf_model(tmp_path / "small", "llama", vocab_size=16))  # its tokenizer has 32 tokens
    tokenizer, n_saved = load_tokenizer(small)
    with pytest.raises(LMKitError, match=r"^--model_name_or_path tok: the tokenizer has 32 tokens but the model's "):
        prepare_model(small, tokenizer, n_saved, [], tokenizer_spec="tok")


@pytest.mark.parametrize(
    "flags, grouped",
    [
        ([], True),  # unpacked SFT rows: grouped by length unless asked otherwise
        (["--train_sampling_strategy", "random"], False),
        (["--packing", "true"], False),  # packed rows have one length
    ],
)
def test_sft_batches_are_grouped_by_length_by_default(lmkit_base, tmp_path, caplog, monkeypatch, flags, grouped):
    import lmkit.trainer

    measured = []  # the rows whose lengths the trainer's length-grouped sampler read
    real = lmkit.trainer.sequence_lengths
    monkeypatch.setattr(lmkit.trainer, "sequence_lengths", lambda ds: measured.append(len(ds)) or real(ds))
    train, _ = reversal_task()
    data = write_jsonl(tmp_path / "train.jsonl", reversal_rows(train[:64]))
    with caplog.at_level(logging.INFO, logger="lmkit"):
        run("--model_name_or_path", lmkit_base, "--train_files", data, "--output_dir", tmp_path / "out",
            "--block_size", 32, "--max_steps", 1, "--per_device_train_batch_size", 8, "--eval_strategy", "no",
            "--save_strategy", "no", *flags)  # fmt: skip
    assert ("SFT batches are grouped by length" in caplog.text) is grouped
    assert measured == ([61] if grouped else [])  # 64 examples, 3 held out for validation
