"""What lmkit writes works in the tools users already have: every model folder (checkpoint-N, the final output, a
merged LoRA model) loads with ``trust_remote_code=True`` where lmkit cannot be imported, and TRL's trainers take an
lmkit SFT output as their starting model (TRL is a test-only extra: ``pip install -e .[dev]``)."""

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
from transformers import AutoModelForCausalLM

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
