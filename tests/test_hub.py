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
