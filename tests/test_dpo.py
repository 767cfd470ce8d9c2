"""Preference tuning (lmkit.dpo, recipes/dpo.py): parity with TRL, data formats, packing, the recipe, bad input."""

import copy
import itertools
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from _recipes import load_recipe
from datasets import Dataset
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmkit import LMConfig, LMForCausalLM
from lmkit.args import DataArguments, LMTrainingArguments, ModelArguments, parse_args
from lmkit.dpo import (
    PreferenceCollator,
    PreferenceTrainer,
    build_preference_dataset,
    enable_token_logps,
    extract_prompt,
    preference_loss,
    read_preference_rows,
    sequence_logps,
    tokenize_pair,
)
from lmkit.dpo_args import PreferenceArguments, fit_sft_weight
from lmkit.errors import LMKitError
from lmkit.finetune_args import FinetuneArguments
from lmkit.sft import DEFAULT_CHAT_TEMPLATE
from lmkit.tokenizer import build_tokenizer

dpo = load_recipe("dpo")

ALPHABET = "abcdefghijklmnopqrstuvwxyz\n: "
QUIET = [
    "--report_to",
    "none",
    "--use_cpu",
    "true",
    "--bf16",
    "false",
    "--disable_tqdm",
    "true",
    "--peak_flops",
    "1e12",
]
WORDS = ["abc", "bcde", "cd", "defgh"]


@pytest.fixture(autouse=True)
def one_thread():
    # The CPU is shared: one thread per test process is several times faster than two fighting threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def char_tokenizer(alphabet: str = ALPHABET):
    return build_tokenizer("char", [alphabet])  # 32 tokens: 29 characters, eos, pad, unk


def tiny_model(tok, hidden: int = 32, init: float = 0.2, seed: int = 0, kv_heads: int | None = 2) -> LMForCausalLM:
    torch.manual_seed(seed)
    config = LMConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      initializer_range=init, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    return LMForCausalLM(config)


def pair_rows(prompt=lambda w: f"reverse: {w}\n"):
    """Pairs of unequal answer lengths, so padding and length normalisation both matter."""
    return [{"prompt": prompt(w), "chosen": w[::-1], "rejected": w + "x" * i} for i, w in enumerate(WORDS)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def lmkit_loss(model, features, pref_args, ref=None, packing=False):
    enable_token_logps(model)
    batch = PreferenceCollator(pad_token_id=2, packing=packing)(features)
    ref_logps = None
    if ref is not None:
        enable_token_logps(ref)
        with torch.no_grad():
            ref_logps, _ = sequence_logps(ref, batch)
    model.train()
    logps, counts = sequence_logps(model, batch)
    loss, metrics = preference_loss(pref_args, logps, counts, ref_logps)
    loss.backward()
    return loss, metrics


# -- parity with TRL --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """A tiny policy and a reference that differs from it (so the log-ratios are not zero)."""
    tok = char_tokenizer()
    policy = tiny_model(tok)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy, ref


def assert_same(loss, trl_loss, model, trl_model, metrics, trl_metrics, names):
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-5)
    trl_grads = grads(trl_model)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=0, atol=1e-5, msg=f"gradient of {name}")
    worst = max((grad - trl_grads[name]).abs().max().item() for name, grad in grads(model).items())
    print(
        f"loss {loss.item():.8f} vs TRL {trl_loss.item():.8f} (|diff| {abs(loss - trl_loss).item():.1e}); "
        f"largest gradient difference {worst:.1e}"
    )
    for name in names:
        assert metrics[name].mean().item() == pytest.approx(trl_metrics[name], abs=1e-5), name


@pytest.mark.parametrize(("loss_type", "sft_weight"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_dpo_loss_and_gradients_match_trl_dpo_trainer(models, loss_type, sft_weight, tmp_path):
    from trl import DPOConfig, DPOTrainer

    tok, policy, ref = copy.deepcopy(models)
    rows = pair_rows()
    data = build_preference_dataset(rows, tok, 64)
    features = [data[i] for i in range(len(data))]

    def trl_example(f):
        n = next(i for i, t in enumerate(f["chosen_labels"]) if t != -100)
        ids = f["chosen_input_ids"]
        return {"prompt_ids": ids[:n], "chosen_ids": ids[n:], "rejected_ids": f["rejected_input_ids"][n:]}

    trl_policy = copy.deepcopy(policy)
    # --sft_weight w is TRL's loss_type [..., "sft"] with loss_weights [1, w]
    losses = [loss_type, "sft"] if sft_weight else [loss_type]
    config = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_type=losses, beta=0.3,
                       loss_weights=[1.0, sft_weight] if sft_weight else None, precompute_ref_log_probs=False,
                       bf16=False)  # fmt: skip
    trainer = DPOTrainer(
        model=trl_policy, ref_model=copy.deepcopy(ref), args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )  # fmt: skip
    trl_policy.train()
    trl_loss = trainer.compute_loss(trl_policy, trainer.data_collator([trl_example(f) for f in features]))
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    args = PreferenceArguments(loss_type=loss_type, beta=0.3, sft_weight=sft_weight)
    loss, metrics = lmkit_loss(policy, features, args, ref)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"]  # fmt: skip
    assert_same(loss, trl_loss, policy, trl_policy, metrics, trl_metrics, names)


def cpo_style_batch(features, pad_token_id):
    """The (unshifted, -100 on the prompt) batch TRL's CPOTrainer / ORPOTrainer build from their own tokenization."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [torch.tensor(f[f"{side}_input_ids"]) for f in features]
        batch[f"{side}_input_ids"] = pad_sequence(ids, batch_first=True, padding_value=pad_token_id)
        batch[f"{side}_attention_mask"] = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
        labels = [torch.tensor(f[f"{side}_labels"]) for f in features]
        batch[f"{side}_labels"] = pad_sequence(labels, batch_first=True, padding_value=-100)
    return batch


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(models, label_smoothing, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok, policy, _ = copy.deepcopy(models)
    rows = pair_rows()
    features = list(build_preference_dataset(rows, tok, 64))
    trl_policy = copy.deepcopy(policy)
    config = CPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_type="simpo", cpo_alpha=0.0,
                       beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing, bf16=False)  # fmt: skip
    trainer = CPOTrainer(model=trl_policy, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trl_policy.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trl_policy, cpo_style_batch(features, tok.pad_token_id))
    trl_loss.backward()

    args = PreferenceArguments(loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing)
    loss, metrics = lmkit_loss(policy, features, args)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"]
    assert_same(loss, trl_loss, policy, trl_policy, metrics, trl_metrics, names)


def test_orpo_matches_trl_orpo_trainer(models, tmp_path):
    # TRL's ORPOTrainer puts the prompt's tokens into its NLL term too; lmkit (like the ORPO paper) only the chosen
    # answer's. With empty prompts the two are the same sum, so loss and gradients must agree exactly.
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok, policy, _ = copy.deepcopy(models)
    rows = pair_rows(prompt=lambda w: "")
    features = list(build_preference_dataset(rows, tok, 64))
    trl_policy = copy.deepcopy(policy)
    config = ORPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.3, bf16=False)
    trainer = ORPOTrainer(model=trl_policy, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trl_policy.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trl_policy, cpo_style_batch(features, tok.pad_token_id))
    trl_loss.backward()

    loss, metrics = lmkit_loss(policy, features, PreferenceArguments(loss_type="orpo", beta=0.3))
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "nll_loss", "log_odds_ratio",
             "log_odds_chosen"]  # fmt: skip
    assert_same(loss, trl_loss, policy, trl_policy, metrics, trl_metrics, names)


# -- packing and the chunked head -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_packed_pairs_give_the_unpacked_loss_and_gradients(models, loss_type):
    tok, policy, ref = copy.deepcopy(models)
    features = list(build_preference_dataset(pair_rows(), tok, 64))
    packed_policy = copy.deepcopy(policy)
    use_ref = ref if loss_type == "sigmoid" else None
    loss, _ = lmkit_loss(policy, features, PreferenceArguments(loss_type=loss_type), use_ref)
    packed_loss, _ = lmkit_loss(packed_policy, features, PreferenceArguments(loss_type=loss_type), use_ref, True)
    batch = PreferenceCollator(pad_token_id=2, packing=True)(features)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one padding-free row
    assert batch["position_ids"][0].tolist().count(0) == 2 * len(features)  # positions restart per sequence
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-5)
    packed_grads = grads(packed_policy)
    for name, grad in grads(policy).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_chunked_log_probs_equal_full_logits(models):
    from lmkit.dpo import token_logps

    tok, policy, _ = copy.deepcopy(models)
    hidden = torch.randn(11, 32, requires_grad=True)
    targets = torch.randint(0, 64, (11,))
    full = torch.log_softmax(policy.lm_head(hidden), -1).gather(1, targets[:, None])[:, 0]
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    chunked = token_logps(policy.lm_head, hidden, targets, chunk=3)  # 4 chunks, checkpointed
    (g_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_full, rtol=0, atol=1e-6)


# -- data formats -----------------------------------------------------------------------------------------------


def test_explicit_pair_tokens_and_scored_positions():
    tok = char_tokenizer()
    out = tokenize_pair({"prompt": "ab:", "chosen": "c", "rejected": "dd"}, tok, max_length=64)
    a, b, colon, c, d, eos = tok.convert_tokens_to_ids(["a", "b", ":", "c", "d", tok.eos_token])
    assert out["chosen_input_ids"] == [a, b, colon, c, eos]
    assert out["chosen_labels"] == [-100, -100, -100, c, eos]  # the answer and its EOS are scored, not the prompt
    assert out["rejected_input_ids"] == [a, b, colon, d, d, eos]
    assert out["status"] == 0
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id)([out])
    assert batch["input_ids"].tolist() == [[a, b, colon, c, tok.pad_token_id], [a, b, colon, d, d]]
    assert batch["targets"].tolist() == [[-100, -100, c, eos, -100], [-100, -100, d, d, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["sequence_ids"][:, 0].tolist() == [0, 1]
    # max_length: an answer is cut at the end; a prompt without room leaves the pair dropped
    assert tokenize_pair({"prompt": "ab:", "chosen": "c", "rejected": "dd"}, tok, max_length=5)["status"] == 1
    assert tokenize_pair({"prompt": "ab:", "chosen": "c", "rejected": "dd"}, tok, max_length=3)["status"] == 2


def test_implicit_prompt_is_the_shared_prefix():
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    user = {"role": "user", "content": "q"}
    chosen, rejected = [user, {"role": "assistant", "content": "a"}], [user, {"role": "assistant", "content": "b"}]
    assert extract_prompt(chosen, rejected) == ([user], chosen[1:], rejected[1:])


def test_conversational_rows_explicit_and_implicit_tokenize_alike():
    tok = char_tokenizer(ALPHABET + "<|>_\n")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE.read_text()
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
    ]
    explicit = {
        "prompt": history,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    implicit = {"chosen": history + explicit["chosen"], "rejected": history + explicit["rejected"]}
    rows, _ = read_preference_rows(iter([("a", explicit), ("b", implicit)]), "--train_files")
    first, second = (tokenize_pair(r, tok, 256) for r in rows)
    assert first == second
    scored = "".join(tok.convert_ids_to_tokens([t for t in first["chosen_labels"] if t != -100]))
    # only the final answer (its content and the template's end-of-turn) is scored: "yo" is context
    assert scored.startswith("good") and "yo" not in scored and scored.endswith(tok.eos_token)


def test_parquet_and_jsonl_files_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmkit.args import DataArguments
    from lmkit.dpo import load_preference_rows

    rows = pair_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    read = [
        load_preference_rows(DataArguments(train_files=[str(f)], validation_split=0.0), seed=0)["train"]
        for f in (tmp_path / "p.parquet", jsonl)
    ]
    assert read[0] == read[1] == rows


# -- the recipe -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo-base")
    tok = char_tokenizer()
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prefs_file(tmp_path: Path, n: int = 24) -> Path:
    words = ["".join(p) for p in itertools.product("abcdefg", repeat=3)][:n]
    return write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"reverse: {w}\n", "chosen": w[::-1], "rejected": w}
                                                  for w in words])  # fmt: skip


def run(*argv) -> dict:
    return dpo.main([*map(str, argv), *QUIET])


SHORT = ["--max_length", 32, "--max_steps", 3, "--per_device_train_batch_size", 4, "--learning_rate", 1e-3,
         "--eval_steps", 1000, "--save_strategy", "no", "--logging_steps", 1]  # fmt: skip


def test_recipe_logs_trl_metrics_and_reuses_the_cached_reference(base, tmp_path, caplog):
    data = prefs_file(tmp_path)
    common = ["--model_name_or_path", base, "--train_files", data, "--cache_dir", tmp_path / "cache", *SHORT]
    with caplog.at_level(logging.INFO, logger="lmkit"):
        metrics = run(*common, "--output_dir", tmp_path / "a")
    assert "reference log-probs of" in caplog.text and "computed" in caplog.text
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):  # fmt: skip
        assert f"eval_{name}" in metrics
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    first = state["log_history"][0]
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0  # step 1: policy == reference
    assert "rewards/margins" in state["log_history"][2]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmkit"):
        again = run(*common, "--output_dir", tmp_path / "b")
    assert "reference log-probs from the cache" in caplog.text
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    # A preference loss is no token cross-entropy: no perplexity in any train or eval log.
    assert not [k for h in state["log_history"] for k in h if "perplexity" in k] and "eval_perplexity" not in metrics
    # The run's record: started from the base folder (which has none of its own), 3 steps, its final metrics.
    (stage,) = json.loads((tmp_path / "a" / "lmkit_run.json").read_text())["stages"]
    assert {k: stage[k] for k in ("recipe", "starting_point", "data", "loss_type", "beta", "steps")} == {
        "recipe": "dpo", "starting_point": str(base), "data": [], "loss_type": "sigmoid", "beta": 0.1, "steps": 3,
    }  # fmt: skip
    assert stage["metrics"]["eval_loss"] == float(f"{metrics['eval_loss']:.6g}")


def test_perplexity_only_where_the_loss_is_a_token_cross_entropy(tmp_path):
    from lmkit.args import LMTrainingArguments
    from lmkit.trainer import LMTrainer

    args = LMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, eval_strategy="no"
    )
    model = tiny_model(char_tokenizer())
    pretrain = LMTrainer(model=model, args=args)
    preference = PreferenceTrainer(model=model, args=args, preference_args=PreferenceArguments())
    for trainer in (pretrain, preference):
        trainer.log({"loss": 0.5})
        trainer.log({"eval_loss": 0.25})
    assert pretrain.state.log_history[0]["perplexity"] == math.exp(0.5)
    assert pretrain.state.log_history[1]["eval_perplexity"] == math.exp(0.25)
    assert [sorted(k for k in h if "perplexity" in k) for h in preference.state.log_history] == [[], []]
    assert preference.state.log_history[0]["loss"] == 0.5 and preference.state.log_history[1]["eval_loss"] == 0.25


def test_lora_reference_is_the_base_and_merge_writes_a_full_model(base, tmp_path):
    data = prefs_file(tmp_path)
    out = tmp_path / "out"
    run("--config", dpo.DEFAULT_DPO_CONFIG.parent / "dpo-lora.yaml", "--model_name_or_path", base,
        "--train_files", data, "--output_dir", out, "--cache_dir", tmp_path / "cache", "--lora_r", 4,
        "--gradient_accumulation_steps", 1, *SHORT)  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["log_history"][0]["rewards/margins"] == 0.0  # adapter at zero: the policy equals the reference
    assert (out / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.get_input_embeddings().num_embeddings == 64


def test_separate_reference_model(base, tmp_path):
    tok = char_tokenizer()
    ref_dir = tmp_path / "ref"
    tiny_model(tok, seed=1).save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    metrics = run(
        "--model_name_or_path",
        base,
        "--ref_model_name_or_path",
        ref_dir,
        "--train_files",
        prefs_file(tmp_path),
        "--output_dir",
        tmp_path / "out",
        "--cache_dir",
        tmp_path / "cache",
        *SHORT,
    )
    assert metrics["eval_rewards/margins"] != 0.0  # another model's log-probs: the rewards are not ~0


# -- defaults that follow the model and the loss ----------------------------------------------------------------

DPO_GROUPS = (ModelArguments, DataArguments, FinetuneArguments, PreferenceArguments, LMTrainingArguments)


def preference_args(*argv) -> PreferenceArguments:
    """The PreferenceArguments recipes/dpo.py parses from ``argv`` (recipes/configs/dpo.yaml unless --config)."""
    return parse_args(DPO_GROUPS, [*map(str, argv), "--report_to", "none"], dpo.DEFAULT_DPO_CONFIG)[3]


@pytest.mark.parametrize("preset", ["default", "--config dpo-lora.yaml"])
def test_preset_sft_weight_gives_way_to_orpo(preset, caplog):
    config = [] if preset == "default" else ["--config", dpo.DEFAULT_DPO_CONFIG.parent / "dpo-lora.yaml"]
    pref = preference_args(*config, "--loss_type", "orpo")
    assert pref.sft_weight == 1.0  # the preset's, not the user's
    with caplog.at_level(logging.INFO, logger="lmkit"):
        fit_sft_weight(pref)
    assert pref.sft_weight == 0.0
    assert [r.getMessage() for r in caplog.records] == [
        "--sft_weight 1 (a default) does not apply to --loss_type orpo, which adds the chosen answers' NLL itself: "
        "using --sft_weight 0"
    ]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_preset_sft_weight_stays_for_the_other_losses(loss_type, caplog):
    pref = preference_args("--loss_type", loss_type)
    with caplog.at_level(logging.INFO, logger="lmkit"):
        fit_sft_weight(pref)
    assert pref.sft_weight == 1.0 and caplog.records == []


@pytest.mark.parametrize("where", ["command line", "user config", "built directly"])
def test_user_set_sft_weight_with_orpo_is_an_error(where, tmp_path):
    if where == "command line":
        pref = preference_args("--loss_type", "orpo", "--sft_weight", 0.5)
    elif where == "user config":
        config = tmp_path / "mine.yaml"
        config.write_text("loss_type: orpo\nsft_weight: 0.5\n")
        pref = preference_args("--config", config)
    else:
        pref = PreferenceArguments(loss_type="orpo", sft_weight=0.5)
    with pytest.raises(LMKitError) as err:
        fit_sft_weight(pref)
    assert str(err.value) == "--sft_weight 0.5: --loss_type orpo already adds the chosen answers' NLL (weight 1)"
    pref = preference_args("--loss_type", "orpo", "--sft_weight", 0)  # an explicit 0 is what orpo needs
    fit_sft_weight(pref)
    assert pref.sft_weight == 0.0


@pytest.fixture
def fresh_lmkit_logger():
    """lmkit's logger as a new process has it: INFO lines are dropped until the recipe's logging set-up (so a line
    logged before that set-up is lost, here as in a real run); restored afterwards."""
    lmkit_logger = logging.getLogger("lmkit")
    level = lmkit_logger.level
    lmkit_logger.setLevel(logging.WARNING)
    yield
    lmkit_logger.setLevel(level)


def test_recipe_logs_the_preset_values_it_fits_to_the_model_and_the_loss(base, tmp_path, fresh_lmkit_logger, caplog):
    run("--model_name_or_path", base, "--train_files", prefs_file(tmp_path), "--output_dir", tmp_path / "out",
        "--cache_dir", tmp_path / "cache", "--loss_type", "orpo", "--max_steps", 1, "--per_device_train_batch_size",
        4, "--eval_strategy", "no", "--save_strategy", "no")  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lmkit")]
    fitted = [
        "--max_length 1024 (a default) exceeds the model's max_position_embeddings 64: using --max_length 64",
        "--sft_weight 1 (a default) does not apply to --loss_type orpo, which adds the chosen answers' NLL itself: "
        "using --sft_weight 0",
    ]
    report = (
        "PreferenceArguments: {'loss_type': 'orpo', 'beta': 0.1, 'label_smoothing': 0.0, 'simpo_gamma': 0.5, "
        "'max_length': 64, 'ref_model_name_or_path': None, 'sft_weight': 0.0}"
    )
    assert [line for line in lines if "(a default)" in line] == fitted
    assert lines.index(fitted[1]) < lines.index(report)  # logged once logging is set up, before the report


# -- bad input --------------------------------------------------------------------------------------------------


def _bad_cases(tmp_path: Path, base: Path) -> dict[str, tuple[list, str]]:
    good = prefs_file(tmp_path)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                       {"prompt": "a", "chosen": "b"}])  # fmt: skip
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "chosen": "", "rejected": "c"}])
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}] * 3)
    other_tok = char_tokenizer("xyz0123456789 ")
    other = tmp_path / "other-ref"
    tiny_model(other_tok).save_pretrained(other)
    other_tok.save_pretrained(other)
    model = ["--model_name_or_path", base]
    return {
        "pref-missing-rejected": (
            [*model, "--train_files", missing],
            f"--train_files {missing}:2: no 'rejected' field",
        ),
        "pref-empty-answer": ([*model, "--train_files", empty], f"--train_files {empty}:1: empty 'chosen' answer"),
        "pref-all-identical": (
            [*model, "--train_files", same],
            "no preference pairs left (every pair's chosen equals",
        ),
        "pref-no-room": (
            [*model, "--train_files", good, "--max_length", 8],
            "every pair's prompt fills --max_length 8; no answer could be scored",
        ),
        "pref-loss-type": ([*model, "--train_files", good, "--loss_type", "dpo2"], "--loss_type 'dpo2' is unknown"),
        "pref-beta": ([*model, "--train_files", good, "--beta", 0], "--beta must be positive, got 0"),
        "pref-ref-tokenizer": (
            [*model, "--train_files", good, "--ref_model_name_or_path", other],
            f"--ref_model_name_or_path {other}: its tokenizer differs from the policy's",
        ),
        "pref-ref-reference-free": (
            [*model, "--train_files", good, "--ref_model_name_or_path", base, "--loss_type", "simpo"],
            "--ref_model_name_or_path: --loss_type simpo is reference-free",
        ),
        "pref-orpo-sft-weight": (
            [*model, "--train_files", good, "--loss_type", "orpo", "--sft_weight", 1],
            "--sft_weight 1: --loss_type orpo already adds the chosen answers' NLL (weight 1)",
        ),
        "pref-max-length": (
            [*model, "--train_files", good, "--max_length", 65],
            "--max_length 65 exceeds the model's max_position_embeddings 64",
        ),
        "pref-train-on-prompt": (
            [*model, "--train_files", good, "--train_on_prompt", "true"],
            "--train_on_prompt does not apply to preference tuning",
        ),
    }


BAD = ["pref-missing-rejected", "pref-empty-answer", "pref-all-identical", "pref-no-room", "pref-loss-type",
       "pref-beta", "pref-ref-tokenizer", "pref-ref-reference-free", "pref-orpo-sft-weight", "pref-max-length",
       "pref-train-on-prompt"]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(base, tmp_path, capsys, case):
    argv, message = _bad_cases(tmp_path, base)[case]
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(*argv, "--output_dir", out, "--cache_dir", tmp_path / "cache", "--max_steps", 1)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("lmkit: error: ")
    assert message in last_line
    assert not out.exists()


def test_identical_and_roomless_pairs_are_dropped_and_counted(base, tmp_path, caplog):
    rows = [{"prompt": f"reverse: {w}\n", "chosen": w[::-1], "rejected": w} for w in ("abc", "bcd", "cde", "def")]
    rows += [{"prompt": "same", "chosen": "x", "rejected": "x"}] * 2  # dropped: nothing to prefer
    rows += [{"prompt": "a very long prompt that fills the whole budget", "chosen": "a", "rejected": "b"}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        run("--model_name_or_path", base, "--train_files", data, "--validation_files", data, "--output_dir",
            tmp_path / "out", "--cache_dir", tmp_path / "cache", *SHORT, "--max_length", 24)  # fmt: skip
    assert "train: dropped 2 pair(s) whose chosen answer equals the rejected one" in caplog.text
    assert (
        "train: dropped 1 of 5 pairs whose prompt leaves no room for an answer within --max_length 24" in caplog.text
    )


# -- learning ---------------------------------------------------------------------------------------------------


def greedy_behaviour(model_dir: Path, words: list[str]) -> dict[str, int]:
    """Greedy answers to held-out "reverse: w" prompts: the preferred reversal, the rejected copy, or other."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    counts = {"reverse": 0, "copy": 0, "other": 0}
    for w in words:
        inputs = tok(f"reverse: {w}\n", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        counts["reverse" if answer == w[::-1] else "copy" if answer == w else "other"] += 1
    return counts


def unseen_token_mass(model_dir: Path, words: list[str]) -> float:
    """Mean probability the model gives tokens that occur nowhere in the data (the 50 of 64 vocabulary rows
    that are not in "reverse: abcdefg\n" + EOS), at the 4 answer positions of held-out "reverse: w" -> reversal."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    unseen = torch.ones(model.config.vocab_size, dtype=torch.bool)
    unseen[tok("reverse: abcdefg\n")["input_ids"] + [tok.eos_token_id]] = False
    masses = []
    for w in words:
        ids = tok(f"reverse: {w}\n{w[::-1]}{tok.eos_token}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = model(ids).logits[0, -5:-1].softmax(-1)  # predicting the 3 letters and EOS
        masses.append(probs[:, unseen].sum(-1).mean().item())
    return sum(masses) / len(masses)


@pytest.fixture(scope="module")
def reversal_sft(tmp_path_factory):
    """A tiny model SFT'd on both answers to "reverse: w" (the reversal and a copy); train and held-out words."""
    tmp_path = tmp_path_factory.mktemp("dpo-sft")
    tok = char_tokenizer()
    tiny_model(tok, hidden=64, init=0.02, kv_heads=None).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    words = ["".join(p) for p in itertools.product("abcdefg", repeat=3)]
    random.Random(0).shuffle(words)
    train, held_out = words[40:], words[:40]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"reverse: {w}\n", "completion": c}
                                               for w in train for c in (w[::-1], w)])  # fmt: skip
    load_recipe("finetune").main(list(map(str, [
        "--model_name_or_path", tmp_path / "base", "--train_files", sft, "--output_dir", tmp_path / "sft",
        "--block_size", 32, "--max_steps", 150, "--learning_rate", 3e-3, "--per_device_train_batch_size", 32,
        "--eval_strategy", "no", "--save_strategy", "no", *QUIET,
    ])))  # fmt: skip
    pairs = [{"prompt": f"reverse: {w}\n", "chosen": w[::-1], "rejected": w} for w in train]
    held = [{"prompt": f"reverse: {w}\n", "chosen": w[::-1], "rejected": w} for w in held_out]
    files = write_jsonl(tmp_path / "pairs.jsonl", pairs), write_jsonl(tmp_path / "held.jsonl", held)
    return tmp_path / "sft", files, held_out


def dpo_on(reversal_sft, out: Path, *argv) -> dict:
    sft, (pairs, held), _ = reversal_sft
    return run(
        "--model_name_or_path", sft, "--train_files", pairs, "--validation_files", held, "--output_dir", out,
        "--cache_dir", out.parent / "cache", "--max_length", 32, "--per_device_train_batch_size", 16,
        "--eval_steps", 10000, "--save_strategy", "no", "--logging_steps", 10, *argv,
    )  # fmt: skip


@pytest.mark.slow
def test_dpo_on_an_sft_model_prefers_the_chosen_behaviour_on_held_out_prompts(reversal_sft, tmp_path):
    """DPO with the reversal chosen over the copy: held-out reward accuracy and greedy answers move to it."""
    sft, _, held_out = reversal_sft
    before = greedy_behaviour(sft, held_out)
    metrics = dpo_on(reversal_sft, tmp_path / "dpo", "--max_steps", 60, "--learning_rate", 1e-3, "--sft_weight", 0)
    after = greedy_behaviour(tmp_path / "dpo", held_out)
    print(f"held-out greedy answers (of {len(held_out)}): SFT {before}, after DPO {after}; eval reward accuracy "
          f"{metrics['eval_rewards/accuracies']:.2f}, margin {metrics['eval_rewards/margins']:.3f}")  # fmt: skip
    assert metrics["eval_rewards/accuracies"] >= 0.9
    assert after["reverse"] >= before["reverse"] + 8 and after["copy"] <= before["copy"] // 2


@pytest.mark.long  # two 200-step DPO runs: ~3-5 min on 2 cores; `pytest -m long tests/test_dpo.py`
def test_sft_weight_keeps_probability_off_never_seen_tokens(reversal_sft, tmp_path):
    """Long DPO drains probability from both answers into tokens the data never shows (they move with the hidden
    states: their rows get only Adam-normalised crumbs of gradient); the chosen answers' NLL (--sft_weight) stops
    that, and greedy answers stay well-formed."""
    sft, _, held_out = reversal_sft
    long = ["--max_steps", 200, "--learning_rate", 1e-3]
    dpo_on(reversal_sft, tmp_path / "plain", *long, "--sft_weight", 0)
    dpo_on(reversal_sft, tmp_path / "anchored", *long, "--sft_weight", 1.0)
    mass = {name: unseen_token_mass(tmp_path / name, held_out) for name in ("plain", "anchored")}
    mass["sft"] = unseen_token_mass(sft, held_out)
    greedy = {name: greedy_behaviour(tmp_path / name, held_out) for name in ("plain", "anchored")}
    print(f"never-seen-token probability at answer positions: {mass}; held-out greedy answers: {greedy}")
    assert mass["plain"] > 5 * mass["sft"]  # the failure --sft_weight exists for
    assert mass["anchored"] <= mass["sft"]
    assert greedy["anchored"]["reverse"] >= 36


def test_resume_reproduces_the_uninterrupted_run(base, tmp_path):
    import shutil

    data = prefs_file(tmp_path)
    common = ["--model_name_or_path", base, "--train_files", data, "--cache_dir", tmp_path / "cache", *SHORT,
              "--max_steps", 4, "--save_strategy", "steps", "--save_steps", 2, "--eval_strategy", "no"]  # fmt: skip
    run(*common, "--output_dir", tmp_path / "straight")
    interrupted = tmp_path / "interrupted"  # what a run killed after step 2 leaves: its checkpoint-2
    interrupted.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", interrupted / "checkpoint-2")
    run(*common, "--output_dir", interrupted, "--resume_from_checkpoint", "auto")
    straight = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())["log_history"]
    resumed = json.loads((interrupted / "trainer_state.json").read_text())["log_history"]
    loss = {e["step"]: e["loss"] for e in straight if "loss" in e}
    assert {e["step"]: e["loss"] for e in resumed if "loss" in e and e["step"] > 2} == {3: loss[3], 4: loss[4]}
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForCausalLM.from_pretrained(interrupted).state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "config",
    [
        "cpu.yaml",
        "fsdp.yaml",
        *(pytest.param(c, marks=pytest.mark.long) for c in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml")),
    ],
)  # DeepSpeed rows: `pytest -m long` (the default suite stays <= 15 min on 2 cores)
def test_two_process_runs_match_one_process(base, tmp_path, config):
    """accelerate launch, 2 CPU processes x 2 pairs = one process x 4 pairs: same losses and rewards (DDP, ZeRO-2,
    ZeRO-3 with its sharded weights gathered for the reference pass, FSDP2)."""
    import os
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    data = prefs_file(tmp_path)
    common = ["--model_name_or_path", base, "--train_files", data, *SHORT, "--max_steps", 3,
              "--gradient_accumulation_steps", 1, "--eval_strategy", "no"]  # 3 x 4 pairs: within one epoch  # fmt: skip
    single = tmp_path / "single"
    run(*common, "--output_dir", single, "--per_device_train_batch_size", 4, "--cache_dir", tmp_path / "c1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", repo / "accelerate_configs" / config,
           "--num_processes", 2, "--main_process_port", port, repo / "recipes/dpo.py", *common, "--output_dir",
           tmp_path / "ddp", "--per_device_train_batch_size", 2, "--cache_dir", tmp_path / "c2", *QUIET]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    proc = subprocess.run(list(map(str, cmd)), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = {name: json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
               for name in ("single", "ddp")}  # fmt: skip
    for key in ("loss", "rewards/margins", "logps/chosen"):
        one = [e[key] for e in history["single"] if key in e]
        two = [e[key] for e in history["ddp"] if key in e]
        assert len(one) == 3 and one == pytest.approx(two, abs=5e-3), key


def test_orpo_with_an_sft_weight_is_refused_by_the_loss_itself():
    """A library caller that skips `fit_sft_weight` cannot add ORPO's NLL twice; with the weight fitted to 0 it runs."""
    args = PreferenceArguments(loss_type="orpo", sft_weight=0.0)
    logps, counts = torch.tensor([-4.0, -6.0]), torch.tensor([2.0, 3.0])  # one pair: chosen, rejected
    loss, _ = preference_loss(args, logps, counts)
    assert torch.isfinite(loss)
    args.sft_weight = 1.0
    with pytest.raises(ValueError, match="would add the chosen answers' NLL twice"):
        preference_loss(args, logps, counts)
