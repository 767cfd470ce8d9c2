"""lmkit.hub's loading rules: which model arguments are local folders, and reading a model's config."""

import json
from pathlib import Path

import pytest

from lmkit.errors import LMKitError
from lmkit.finetune import resolve_starting_point
from lmkit.hub import check_model_dir, load_config, local_path


def test_local_path_is_what_exists_or_looks_like_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert local_path("gpt2") == Path("gpt2")  # it exists here: a folder, not the hub's gpt2
    assert local_path("distilgpt2") is None  # a hub id
    assert local_path("org/model") is None  # a hub id: one slash
    assert local_path("outputs/run/checkpoint-5") is not None  # two slashes: no hub id has them
    assert local_path("./model") is not None and local_path("/abs/model") is not None
    assert local_path("~/model") == Path.home() / "model"


def test_both_model_flags_follow_the_one_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A hub id passes through both untouched (nothing is downloaded here) ...
    assert check_model_dir("org/model") is None
    assert resolve_starting_point("org/model") == "org/model"
    # ... and a missing path is an error naming each recipe's flag.
    with pytest.raises(LMKitError, match=r"^--model ./missing: no such model folder$"):
        check_model_dir("./missing")
    with pytest.raises(LMKitError, match=r"^--model_name_or_path a/b/c: no such directory \(and not a hub id\)$"):
        resolve_starting_point("a/b/c")


def test_load_config_names_the_flag_it_was_given(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(LMKitError, match=rf"^--model_name_or_path {tmp_path}: could not load its config \(ValueError"):
        load_config(str(tmp_path), flag="--model_name_or_path")
    with pytest.raises(LMKitError, match=rf"^--model {tmp_path}: could not load its config"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "lmkit", "max_position_embeddings": 96}))
    assert load_config(str(tmp_path)).max_position_embeddings == 96


# -- the lineage a run leaves (lmkit_run.json) and the card's stages ---------------------------------------------

PRETRAIN = {"recipe": "pretrain", "starting_point": None, "data": ["lmkit's bundled corpus (tinyshakespeare.txt)"],
            "steps": 200, "tokens_seen": 409600, "metrics": {"train_loss": 2.5, "eval_loss": 2.25}}  # fmt: skip
SFT = {"recipe": "finetune", "data": ["qa.jsonl"], "steps": 150, "tokens_seen": None,
       "metrics": {"train_loss": 1.5, "eval_loss": 1.125, "eval_perplexity": 3.08}}  # fmt: skip
DPO = {"recipe": "dpo", "data": ["prefs.jsonl"], "loss_type": "sigmoid", "beta": 0.1, "steps": 150,
       "tokens_seen": None, "metrics": {"eval_loss": 0.25, "eval_rewards/accuracies": 0.96875}}  # fmt: skip


def test_each_run_carries_its_parents_stages_even_when_their_folders_are_gone(tmp_path):
    import shutil

    from lmkit.hub import RUN_RECORD, read_stages, write_run_record

    pretrain, sft, dpo = tmp_path / "pretrain", tmp_path / "sft", tmp_path / "dpo"
    for folder in (pretrain, sft, dpo):
        folder.mkdir()
    write_run_record(pretrain, PRETRAIN)
    write_run_record(sft, {**SFT, "starting_point": str(pretrain)})
    shutil.rmtree(pretrain)  # the SFT record copied the pretrain stage: nothing is lost
    write_run_record(dpo, {**DPO, "starting_point": str(sft)})
    assert json.loads((dpo / RUN_RECORD).read_text())["stages"] == [
        PRETRAIN,
        {**SFT, "starting_point": str(pretrain)},
        {**DPO, "starting_point": str(sft)},
    ]
    # A merged LoRA model (<run>/merged) takes its run's record; a hub starting point is one stage naming it.
    (dpo / "merged").mkdir()
    assert [s["recipe"] for s in read_stages(dpo / "merged")] == ["pretrain", "finetune", "dpo"]
    write_run_record(sft, {**SFT, "starting_point": "org/base-model"})
    assert read_stages(sft) == [
        {"recipe": None, "model": "org/base-model"},
        {**SFT, "starting_point": "org/base-model"},
    ]


def test_a_run_without_a_record_becomes_one_stage_from_its_trainer_state(tmp_path):
    from lmkit.hub import read_stages, stage_metrics

    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 30, "log_history": []}))
    (tmp_path / "eval_results.json").write_text(json.dumps({"eval_loss": 2.0, "eval_runtime": 1.5, "epoch": 3.0}))
    assert read_stages(tmp_path) == [
        {"recipe": None, "output_dir": str(tmp_path), "steps": 30, "metrics": {"eval_loss": 2.0}}
    ]
    kept = stage_metrics({"train_loss": 1.23456789, "train_runtime": 9.0, "eval_perplexity": float("inf"),
                          "eval_rewards/margins": 0.5, "eval_samples_per_second": 3.0, "eval_bits_per_byte": 1.0})  # fmt: skip
    assert kept == {"train_loss": 1.23457, "eval_rewards/margins": 0.5, "eval_bits_per_byte": 1.0}


def test_card_lists_the_stages_oldest_first_with_data_and_metrics():
    from lmkit import LMConfig, LMForCausalLM
    from lmkit.hub import RunRecord, build_model_card

    model = LMForCausalLM(LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))  # fmt: skip
    stages = [PRETRAIN, {**SFT, "starting_point": "outputs/pretrain"}, {**DPO, "starting_point": "outputs/sft"}]
    run = RunRecord(metrics={"eval_loss": 0.25, "eval_perplexity": 1.28}, metrics_source="eval_results.json",
                    stages=stages)  # fmt: skip
    card = build_model_card(model, "me/tiny-dpo", "lmkit", run, False, "apache-2.0", None, None)
    text = card.text
    assert "trained with lmkit (pretrain -> finetune -> dpo (DPO))" in text
    rows = [
        "| 1 | pretraining | scratch | `lmkit's bundled corpus (tinyshakespeare.txt)` | 200 (409,600 tokens) | "
        "train_loss 2.5, eval_loss 2.25 |",
        "| 2 | supervised fine-tuning (SFT) | `outputs/pretrain` | `qa.jsonl` | 150 | "
        "train_loss 1.5, eval_loss 1.125, eval_perplexity 3.08 |",
        "| 3 | preference tuning, DPO (beta 0.1) | `outputs/sft` | `prefs.jsonl` | 150 | "
        "eval_loss 0.25, eval_rewards/accuracies 0.9688 |",
    ]
    positions = [text.index(row) for row in rows]
    assert positions == sorted(positions)
    # The last stage's loss is a preference loss: the card claims no language-model loss or perplexity for it.
    assert card.data.eval_results is None and "No evaluation recorded." in text
    sft_card = build_model_card(model, "me/tiny-sft", "lmkit", RunRecord(metrics=run.metrics,
                                metrics_source="eval_results.json", stages=stages[:2]), False, "mit", None, None)  # fmt: skip
    assert {r.metric_type: r.metric_value for r in sft_card.data.eval_results} == {"loss": 0.25, "perplexity": 1.28}
    assert "trained with lmkit (pretrain -> finetune)" in sft_card.text and "| 3 |" not in sft_card.text


def test_the_data_a_recipe_command_line_names(tmp_path):
    from lmkit.runtime import command_line_data

    assert command_line_data(
        ["--model_name_or_path", "m", "--train_files", "a.jsonl", "b.jsonl", "--beta", "0.1"]
    ) == [
        "a.jsonl",
        "b.jsonl",
    ]
    config = tmp_path / "c.yaml"
    config.write_text("train_files: [x.jsonl]\nvalidation_files: v.jsonl\ndataset_name: org/hub-data\n")
    assert command_line_data(["--config", str(config), "--validation_files=w.jsonl"]) == [
        "x.jsonl", "w.jsonl", "org/hub-data",
    ]  # fmt: skip
    assert command_line_data(["--dataset_name", "org/prefs", "--dataset_config_name", "small"]) == [
        "org/prefs (small)"
    ]
    assert command_line_data(["--max_steps", "30"]) == ["lmkit's bundled corpus (tinyshakespeare.txt)"]


def _refusal(check, spec) -> str:
    with pytest.raises(LMKitError) as raised:
        check(str(spec))
    return str(raised.value)


def test_a_lora_output_or_a_file_given_as_model_says_what_it_is(tmp_path):
    """evaluate / generate / publish take full model folders: a LoRA run's output dir points to its merged model
    (or says to merge), and a file is named as one."""
    lora = tmp_path / "sft-lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    adapter = "holds a LoRA adapter, not a full model"
    assert _refusal(check_model_dir, lora) == (
        f"--model {lora}: {adapter}; merge it into its base first (finetune --merge_lora true)"
    )
    (lora / "merged").mkdir()
    (lora / "merged" / "config.json").write_text("{}")
    assert _refusal(check_model_dir, lora) == f"--model {lora}: {adapter}; use {lora / 'merged'}, the merged model"
    # finetune's starting point follows the same rule, and names the base the adapter records
    (lora / "merged" / "config.json").unlink()
    (lora / "adapter_config.json").write_text('{"base_model_name_or_path": "outputs/sft-full"}')
    assert _refusal(resolve_starting_point, lora) == (
        f"--model_name_or_path {lora}: {adapter}; merge it into its base model (outputs/sft-full) first (finetune "
        "--merge_lora true)"
    )
    (tmp_path / "model.bin").write_bytes(b"x")
    assert (
        _refusal(check_model_dir, tmp_path / "model.bin")
        == f"--model {tmp_path / 'model.bin'}: a file, not a model folder"
    )
