"""Publishing: the folder loads without lmkit, the llama export is plain Llama, the card carries the metrics,
dry runs need no token, a failed upload is one line and leaves the folder, and the token never lands anywhere."""

import json
import os
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from _recipes import load_recipe
from _tiny_checkpoint import REPO, make_checkpoint
from huggingface_hub import ModelCard
from test_stock_tools import logits_without_lmkit
from transformers import LlamaForCausalLM

FAKE_TOKEN = "hf_lmkitFAKEtoken0123456789abcdefXYZ"
IDS = torch.tensor([[3, 17, 9, 22, 5, 40, 11, 2]])
LMKIT_FILES = {
    "README.md", "config.json", "configuration_lmkit.py", "generation_config.json", "loss_curve.png",
    "model.safetensors", "modeling_lmkit.py", "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip


@pytest.fixture(autouse=True)
def no_saved_login(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A checkpoint with run files and an evaluation.json, exported in both formats by dry runs of the recipe."""
    root = tmp_path_factory.mktemp("publish")
    ckpt = root / "ckpt"
    model, _ = make_checkpoint(ckpt)
    evaluation = {"loss": 3.5, "perplexity": 33.115, "bits_per_byte": 5.05, "files": ["/data/heldout.txt"]}
    (ckpt / "evaluation.json").write_text(json.dumps(evaluation))
    with torch.no_grad():
        logits = model(IDS).logits
    recipe = load_recipe("publish")
    lmkit_dir = recipe.main(["--model", str(ckpt), "--repo_id", "me/tiny", "--export_dir", str(root / "lmkit"),
                             "--dry_run", "--datasets", "tiny_shakespeare"])  # fmt: skip
    llama_dir = recipe.main(["--model", str(ckpt), "--repo_id", "me/tiny", "--export_dir", str(root / "llama"),
                             "--dry_run", "--format", "llama"])  # fmt: skip
    return ckpt, logits, lmkit_dir, llama_dir


def test_lmkit_folder_contents(published):
    _, _, folder, _ = published
    assert {p.name for p in folder.iterdir()} == LMKIT_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lmkit.LMConfig",
        "AutoModel": "modeling_lmkit.LMModel",
        "AutoModelForCausalLM": "modeling_lmkit.LMForCausalLM",
    }
    assert config["model_type"] == "lmkit" and config["use_cache"] is True
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folder_loads_without_lmkit_with_the_same_logits(published, tmp_path):
    _, logits, folder, _ = published
    (theirs,) = logits_without_lmkit([folder], IDS, tmp_path)
    # Exact: the exported model files are byte copies of lmkit's, run on the same CPU with the same weights.
    torch.testing.assert_close(theirs, logits, rtol=0, atol=0)


def test_llama_export_is_plain_llama_with_the_same_logits(published):
    _, logits, _, folder = published
    assert not list(folder.glob("*.py"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits)


def test_model_card_parses_and_carries_the_metrics(published):
    _, _, folder, llama_folder = published
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert (data.library_name, data.license, data.pipeline_tag) == ("transformers", "apache-2.0", "text-generation")
    assert data.datasets == ["tiny_shakespeare"] and "lmkit" in data.tags
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"loss": 3.5, "perplexity": 33.115, "bits_per_byte": 5.05}
    assert {r.dataset_name for r in data.eval_results} == {"heldout.txt"}
    for text in ("trust_remote_code=True", "Tokens seen: 4,096", "| learning_rate | 0.001 |", "loss_curve.png",
                 "| layers | 2 |", "| bits_per_byte | 5.0500 |"):  # fmt: skip
        assert text in card.text, text
    llama_card = ModelCard.load(llama_folder / "README.md").text
    assert "LlamaForCausalLM" in llama_card and "trust_remote_code" not in llama_card


@pytest.mark.parametrize("fmt", ["lmkit", "llama"])
def test_the_model_cards_usage_code_runs_as_written_without_a_prompt(published, fmt):
    """The card's Usage block, run as a reader pastes it (the repo id pointed at the export): it generates, and
    never stops at transformers' "run the custom code? [y/N]" prompt, which `input()` would print here."""
    _, _, lmkit_folder, llama_folder = published
    folder = lmkit_folder if fmt == "lmkit" else llama_folder
    card = (folder / "README.md").read_text()
    code = card.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code.replace('"me/tiny"', repr(str(folder)))], input="n\n",
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr, proc.stdout[-2000:]
    assert proc.stdout.startswith("ROMEO:"), proc.stdout[-2000:]


def test_default_export_dirs_keep_the_two_formats_apart_without_doubling_a_suffix():
    from lmkit.hub import EXPORTS_ROOT, default_export_dir

    assert default_export_dir("me/tiny", "lmkit") == EXPORTS_ROOT / "tiny"
    assert default_export_dir("me/tiny", "llama") == EXPORTS_ROOT / "tiny-llama"
    assert default_export_dir("me/shakespeare-tiny-llama", "llama") == EXPORTS_ROOT / "shakespeare-tiny-llama"


def test_publishing_a_dpo_model_lists_its_three_stages(tmp_path):
    ckpt = tmp_path / "dpo"
    make_checkpoint(ckpt)  # its eval_results.json now holds the DPO loss, which is no language-model loss
    stages = [
        {"recipe": "pretrain", "starting_point": None, "data": ["corpus.txt"], "steps": 200, "metrics": {"eval_loss": 2.5}},
        {"recipe": "finetune", "starting_point": "outputs/pretrain", "data": ["qa.jsonl"], "steps": 150, "metrics": {}},
        {"recipe": "dpo", "starting_point": "outputs/sft", "data": ["prefs.jsonl"], "loss_type": "ipo", "beta": 0.5,
         "steps": 100, "metrics": {"eval_rewards/accuracies": 1.0}},
    ]  # fmt: skip
    (ckpt / "lmkit_run.json").write_text(json.dumps({"stages": stages}))
    folder = load_recipe("publish").main(["--model", str(ckpt), "--repo_id", "me/tiny-dpo", "--export_dir",
                                          str(tmp_path / "out"), "--dry_run"])  # fmt: skip
    card = ModelCard.load(folder / "README.md")
    rows = [
        "| 1 | pretraining | scratch | `corpus.txt` | 200 | eval_loss 2.5 |",
        "| 2 | supervised fine-tuning (SFT) | `outputs/pretrain` | `qa.jsonl` | 150 |  |",
        "| 3 | preference tuning, IPO (beta 0.5) | `outputs/sft` | `prefs.jsonl` | 100 | eval_rewards/accuracies 1 |",
    ]
    assert [card.text.index(row) for row in rows] == sorted(card.text.index(row) for row in rows)
    assert "(pretrain -> finetune -> dpo (IPO))" in card.text
    training_data = card.text.split("## Training data\n\n", 1)[1].split("\n", 1)[0]
    assert training_data.startswith("Each stage's data is listed under Training stages")  # not "Not recorded"
    assert card.data.eval_results is None  # eval_results.json's 3.25 is a preference loss: not claimed as nats/token


def test_reexport_replaces_an_earlier_export_but_refuses_a_foreign_folder(published, tmp_path, capsys):
    ckpt, _, _, _ = published
    recipe = load_recipe("publish")
    argv = ["--model", str(ckpt), "--repo_id", "me/tiny", "--dry_run", "--export_dir", str(tmp_path / "out")]
    recipe.main(argv)
    recipe.main([*argv, "--format", "llama"])
    assert not list((tmp_path / "out").glob("*.py"))  # no stale lmkit code left to upload
    (tmp_path / "out" / "notes").mkdir()
    with pytest.raises(SystemExit):
        recipe.main(argv)
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--repo_id", "me/bad name"], "--repo_id 'me/bad name' is not a valid repository id"),
        (["--repo_id", "a/b/c", "--dry_run"], "is not a valid repository id"),
        (["--repo_id", "me/tiny"], "no Hugging Face token: set HF_TOKEN"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(published, tmp_path, capsys, argv, expected):
    ckpt, _, _, _ = published
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("publish").main(["--model", str(ckpt), "--export_dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_upload_without_network_fails_cleanly_and_never_writes_the_token(published, tmp_path):
    ckpt, _, _, _ = published
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_TOKEN=FAKE_TOKEN, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    cmd = [sys.executable, str(REPO / "recipes" / "publish.py"), "--model", str(ckpt), "--repo_id", "me/tiny",
           "--export_dir", str(out), "--private", "--revision", "v1", "--commit_message", "first"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "upload to http://127.0.0.1:9/me/tiny failed" in proc.stderr and f"intact at {out}" in proc.stderr
    assert {p.name for p in out.iterdir()} == LMKIT_FILES and "me/tiny@v1 (private)" in proc.stdout
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    for folder in (out, ckpt, tmp_path):
        for file in folder.rglob("*"):
            if file.is_file():
                assert FAKE_TOKEN.encode() not in file.read_bytes(), file
