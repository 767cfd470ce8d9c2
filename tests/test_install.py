"""``pip install .`` without ``-e`` works: the bundled corpus and the chat template come from the installed package,
and a recipe copied out of the checkout finds its default preset beside itself.

Isolation: the package is built from a copy of the source (pyproject.toml, README.md, lmkit/) and installed with
``pip install --no-deps --no-build-isolation --no-index --target T``. The run is a fresh ``python -I -S``: no site
module, so no .pth file runs and the editable install's finder never loads; sys.path is T, the standard library
and this environment's site-packages (for torch, transformers, ...), and the test asserts that T is the only entry
holding an ``lmkit``. The recipe and its configs are copied to a temporary folder and run from another one.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from _tiny_checkpoint import REPO

RUN_SCRIPT = """
import importlib.util, json, sys
from pathlib import Path

target, site_packages, recipe, report, *argv = sys.argv[1:]
sys.path.insert(0, target)
sys.path.append(site_packages)
holders = [p for p in sys.path if (Path(p or ".") / "lmkit").exists()]
assert holders == [target], f"lmkit importable from {holders}"

import lmkit.args, lmkit.sft
from lmkit.sft import resolve_chat_template
from transformers import AutoTokenizer

spec = importlib.util.spec_from_file_location("pretrain", recipe)
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)
pretrain.main(argv)

tokenizer = AutoTokenizer.from_pretrained("out")
assert tokenizer.chat_template is None  # so resolve_chat_template falls back to lmkit's bundled ChatML file
template, markers = resolve_chat_template(None, tokenizer)
tokenizer.chat_template = template
chat = tokenizer.apply_chat_template([{"role": "user", "content": "Who is there?"}], tokenize=False)
Path(report).write_text(json.dumps({
    "lmkit": lmkit.__file__, "corpus": str(lmkit.args.BUNDLED_CORPUS), "template_file": str(lmkit.sft.DEFAULT_CHAT_TEMPLATE),
    "preset": str(pretrain.DEFAULT_CONFIG), "template": template, "markers": markers, "chat": chat,
}))
"""


def install_non_editable(tmp_path: Path) -> Path:
    """Build lmkit from a copy of its sources and install it (no dependencies) into a bare target folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lmkit", src / "lmkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
           "--target", str(target), str(src)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


@pytest.mark.slow
def test_regular_install_pretrains_on_the_bundled_corpus_from_outside_the_checkout(tmp_path):
    target = install_non_editable(tmp_path)
    assert (target / "lmkit" / "corpus" / "tinyshakespeare.txt").read_bytes() == (
        REPO / "lmkit" / "corpus" / "tinyshakespeare.txt"
    ).read_bytes()
    assert (target / "lmkit" / "templates" / "chatml.jinja").is_file()
    assert not (target / "data").exists() and not (target / "recipes").exists()

    recipes = tmp_path / "recipes"  # a recipe outside the checkout, with its presets beside it
    shutil.copytree(REPO / "recipes" / "configs", recipes / "configs")
    shutil.copy(REPO / "recipes" / "pretrain.py", recipes / "pretrain.py")
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    # No --config, no --train_files: the default preset (tiny.yaml, BPE tokenizer of 2,048 tokens, 2 K/V heads)
    # and the bundled corpus; the flags below only shrink the run.
    argv = ["--output_dir", "out", "--max_steps", "2", "--hidden_size", "32", "--num_hidden_layers", "1",
            "--intermediate_size", "64", "--block_size", "32", "--max_position_embeddings", "32",
            "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--eval_on_start", "false",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
            "--disable_tqdm", "true", "--logging_steps", "1"]  # fmt: skip
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", RUN_SCRIPT, str(target), sysconfig.get_paths()["purelib"],
         str(recipes / "pretrain.py"), str(report), *argv],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(report.read_text())

    assert got["lmkit"] == str(target / "lmkit" / "__init__.py")
    assert got["corpus"] == str(target / "lmkit" / "corpus" / "tinyshakespeare.txt")
    assert got["template_file"] == str(target / "lmkit" / "templates" / "chatml.jinja")
    assert got["preset"] == str(recipes / "configs" / "tiny.yaml")
    assert got["template"] == (REPO / "lmkit" / "templates" / "chatml.jinja").read_text(encoding="utf-8")
    assert got["markers"] == ["<|im_start|>", "<|im_end|>"]
    assert "<|im_start|>user\nWho is there?<|im_end|>" in got["chat"]

    out = workdir / "out"
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["num_key_value_heads"], config["hidden_size"]) == (2048, 2, 32)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "modeling_lmkit.py").read_bytes() == (
        target / "lmkit" / "modeling" / "modeling_lmkit.py"
    ).read_bytes()
