"""What lmkit writes works in the tools users already have: every model folder (checkpoint-N, the final output, a
merged LoRA model) loads with ``trust_remote_code=True`` where lmkit cannot be imported, TRL's trainers take an
lmkit SFT output as their starting model, and lm-evaluation-harness scores it (TRL and lm-eval are test-only extras:
``pip install -e .[dev]``)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _recipes import load_recipe
from _tiny_checkpoint import REPO, make_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmkit

IDS = torch.tensor([[3, 17, 9, 22, 5, 40, 11, 2]])
AUTO_MAP = {
    "AutoConfig": "configuration_lmkit.LMConfig",
    "AutoModel": "modeling_lmkit.LMModel",
    "AutoModelForCausalLM": "modeling_lmkit.LMForCausalLM",
}
MODEL_FILES = ("configuration_lmkit.py", "modeling_lmkit.py")
QUIET = ["--report_to", "none", "--use_cpu", "true", "--bf16", "false", "--disable_tqdm", "true"]

# Runs in a fresh interpreter: -I drops the working directory and PYTHONPATH from sys.path, and the meta-path finder
# refuses lmkit whatever else is installed (the editable install's finder included).
NO_LMKIT_SCRIPT = """
import importlib.abc, json, sys

class NoLmkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lmkit" or name.startswith("lmkit."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, NoLmkit())
try:
    import lmkit
    sys.exit("lmkit is importable in the clean process")
except ModuleNotFoundError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folders, ids, out = json.loads(sys.argv[1])
logits = []
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    AutoTokenizer.from_pretrained(folder)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits.append(model(torch.tensor(ids)).logits)
assert not [m for m in sys.modules if m == "lmkit" or m.startswith("lmkit.")]
torch.save(logits, out)
"""


def logits_without_lmkit(folders: list[Path], ids: torch.Tensor, tmp_path: Path) -> list[torch.Tensor]:
    """Each folder's logits for ``ids``, loaded by stock transformers (remote code) in a process without lmkit."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")  # a fresh remote-code module cache
    arg = json.dumps([[str(f) for f in folders], ids.tolist(), str(tmp_path / "logits.pt")])
    proc = subprocess.run(
        [sys.executable, "-I", "-c", NO_LMKIT_SCRIPT, arg], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def write_sft_rows(path: Path, n: int) -> Path:
    rows = [{"prompt": f"ROMEO {i}:", "completion": " Good morrow."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_output(tmp_path_factory) -> Path:
    """A tiny full SFT run of recipes/finetune.py (2 steps, a checkpoint at step 2), and a LoRA run merged."""
    root = tmp_path_factory.mktemp("stock")
    make_checkpoint(root / "base", run_files=False)
    data = write_sft_rows(root / "sft.jsonl", 16)
    finetune = load_recipe("finetune")
    common = ["--model_name_or_path", root / "base", "--train_files", data, "--block_size", 32, "--max_steps", 2,
              "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--eval_strategy", "no", *QUIET]  # fmt: skip
    finetune.main([*map(str, common), "--output_dir", str(root / "full"), "--save_steps", "2"])
    finetune.main([*map(str, common), "--output_dir", str(root / "lora"), "--save_strategy", "no",
                   "--use_lora", "true", "--merge_lora", "true"])  # fmt: skip
    return root


def test_every_model_folder_carries_auto_map_and_the_model_files(sft_output):
    folders = [sft_output / "full" / "checkpoint-2", sft_output / "full", sft_output / "lora" / "merged"]
    for folder in folders:
        assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP, folder
        for name in MODEL_FILES:  # the very files lmkit runs, not a rendering of them
            assert (folder / name).read_bytes() == (REPO / "lmkit" / "modeling" / name).read_bytes(), (folder, name)


def test_model_folders_load_without_lmkit_with_the_same_logits(sft_output, tmp_path):
    folders = [sft_output / "full" / "checkpoint-2", sft_output / "full", sft_output / "lora" / "merged"]
    theirs = logits_without_lmkit(folders, IDS, tmp_path)
    for folder, got in zip(folders, theirs, strict=True):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(model) is lmkit.LMForCausalLM  # in this process lmkit's own class loads it
        with torch.no_grad():
            want = model(IDS).logits
        # Exact: the remote code is a byte copy of lmkit's model files, run on the same CPU with the same weights.
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(folder))
    assert not torch.equal(theirs[1], theirs[2])  # the full and LoRA runs really are different models


def trl_args(config_class, out: Path):
    return config_class(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, max_length=32,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, logging_steps=1,
        trust_remote_code=True,
    )  # fmt: skip


def test_trl_dpo_builds_its_reference_model_from_an_lmkit_output_and_trains(sft_output, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    folder = sft_output / "full"
    start = load_file(folder / "model.safetensors")
    rows = [{"prompt": f"ROMEO {i}:", "chosen": " Good morrow.", "rejected": " Away!"} for i in range(8)]
    # A path string: DPOTrainer loads the policy and, with no ref_model given, builds the reference from the
    # policy's config (_name_or_path), which is where the missing auto_map used to raise AttributeError.
    trainer = trl.DPOTrainer(
        model=str(folder), args=trl_args(trl.DPOConfig, tmp_path), train_dataset=Dataset.from_list(rows)
    )
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    trainer.train()

    policy = trainer.model.state_dict()
    reference = trainer.ref_model.state_dict()
    changed = [k for k in start if not torch.equal(policy[k], start[k])]
    assert sorted(changed) == sorted(start)  # every tensor of the policy moved
    assert all(torch.equal(reference[k], start[k]) for k in start)  # the reference stayed the SFT model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1


def test_trl_sft_trains_an_lmkit_output(sft_output, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    folder = sft_output / "full"
    start = load_file(folder / "model.safetensors")
    rows = [{"prompt": f"JULIET {i}:", "completion": " O Romeo."} for i in range(8)]
    trainer = trl.SFTTrainer(
        model=str(folder), args=trl_args(trl.SFTConfig, tmp_path), train_dataset=Dataset.from_list(rows)
    )
    trainer.train()
    params = trainer.model.state_dict()
    assert sorted(k for k in start if not torch.equal(params[k], start[k])) == sorted(start)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_lm_eval_scores_an_lmkit_output_with_its_own_log_likelihoods(sft_output, tmp_path):
    """EleutherAI's lm-evaluation-harness, as a user types it (`lm_eval --model hf`, a local task YAML, offline), on
    the SFT output: every choice's log-likelihood it reports equals the model's own, summed over the continuation's
    tokens. Its batches mix lengths (4 requests of 5-12 tokens), so this also checks the padded path."""
    rows = [{"context": "ROMEO: ", "choices": ["What is it?", "thou art"], "gold": 0},
            {"context": "JULIET: O", "choices": [" Romeo", "xq"], "gold": 0}]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lmkit_choice.yaml").write_text(
        "task: lmkit_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'rows.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    model_dir = sft_output / "full"
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={model_dir},trust_remote_code=True,dtype=float32", "--tasks", "lmkit_choice",
               "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4", "--output_path",
               str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = (tmp_path / "out").rglob("samples_lmkit_choice_*.jsonl")
    reported = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        for request, ((logp, _),) in zip(sample["arguments"].values(), sample["resps"], strict=True):
            reported[request["arg_0"], request["arg_1"]] = float(logp)
    # a choice follows the context after the task's default target_delimiter, one space
    assert sorted(reported) == sorted((r["context"], " " + c) for r in rows for c in r["choices"])

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    for (context, continuation), logp in reported.items():
        # lm-eval moves the context's trailing spaces to the continuation and encodes the whole string once
        n_spaces = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - n_spaces], context[len(context) - n_spaces :] + continuation
        whole = tok.encode(context + continuation, add_special_tokens=False)
        n_context = len(tok.encode(context, add_special_tokens=False))
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0].float()
        targets = torch.tensor(whole[n_context:])
        own = torch.log_softmax(logits[n_context - 1 :], -1).gather(-1, targets[:, None]).sum()
        # the same fp32 model, batched and padded there, one row here: stated tolerance 1e-4 on values of order 10
        torch.testing.assert_close(torch.tensor(logp), own, atol=1e-4, rtol=1e-5)
