"""One parser: YAML config plus CLI overrides; unknown keys and bad values are one-line errors naming the field."""

from pathlib import Path

import pytest

from lmkit.args import parse_args
from lmkit.errors import LMKitError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("hidden_size: 96\nnum_attention_heads: 3\nlearning_rate: 1.0e-3\nmax_steps: 7\nbf16: false\n")
    return path


def test_yaml_values_reach_every_group(config, tmp_path):
    model_args, data_args, args = parse_args(argv=["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert (model_args.hidden_size, model_args.num_attention_heads) == (96, 3)
    assert args.learning_rate == 1e-3 and args.max_steps == 7 and args.bf16 is False
    assert data_args.block_size == 256  # untouched default


def test_cli_overrides_yaml(config, tmp_path):
    _, _, args = parse_args(
        argv=["--config", str(config), "--learning_rate", "5e-4", "--bf16", "true", "--output_dir", str(tmp_path)]
    )
    assert args.learning_rate == 5e-4 and args.bf16 is True and args.max_steps == 7


def test_lmkit_training_defaults(tmp_path):
    _, _, args = parse_args(argv=["--output_dir", str(tmp_path)])
    assert args.learning_rate == 3e-4
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)
    assert args.weight_decay == 0.01 and args.max_grad_norm == 1.0
    assert args.lr_scheduler_type == "cosine" and args.label_names == ["shift_labels"]


@pytest.mark.parametrize(
    "yaml_text, argv, message",
    [
        ("hidden_sise: 64\n", [], "unknown config key(s): hidden_sise"),
        ("learning_rate: fast\n", [], "bad.yaml: learning_rate: invalid float value: 'fast'"),
        ("", ["--max_steps", "many"], "argument --max_steps"),
        ("", ["--no_such_flag", "1"], "unknown flag --no_such_flag"),
        ("", ["--learning_rat", "1e-3"], "unknown flag --learning_rat (did you mean --learning_rate?)"),
        ("", ["--learning_rate", "-1"], "--learning_rate must be positive"),
        ("", ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        ("", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        ("", ["--hidden_size", "100", "--num_attention_heads", "3"], "--hidden_size 100 is not divisible"),
        ("", ["--block_size", "0"], "--block_size must be positive"),
        ("- a\n- b\n", [], "expected a mapping"),
        ("a: [\n", [], "not valid YAML"),
    ],
)
def test_bad_config_names_the_field(tmp_path, yaml_text, argv, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(LMKitError) as err:
        parse_args(argv=["--config", str(path), "--output_dir", str(tmp_path / "o"), *argv])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("block_size: [1, 2]\n", "block_size takes a single value, got [1, 2]"),
        ("block_size: eight\n", "block_size: invalid int value: 'eight'"),
        ("block_size: {a: 1}\n", "block_size: invalid int value: '{\"a\": 1}'"),
        (
            "bf16: maybe\n",
            "bf16: Truthy value expected: got maybe but expected one of yes/no, true/false, t/f, y/n, "
            "1/0 (case insensitive).",
        ),
        ("train_files: []\n", "train_files takes at least one value, got []"),
        ("train_files: [[a.txt]]\n", "train_files takes a list of single values, got [['a.txt']]"),
    ],
)
def test_config_value_of_wrong_shape_or_type_names_the_key_and_the_file(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(LMKitError) as err:
        parse_args(argv=["--config", str(path), "--output_dir", str(tmp_path / "o")])
    assert str(err.value) == f"--config {path}: {message}"


def test_config_list_flag_takes_one_value_or_a_list(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train_files: a.txt\nblock_size: 8\n")
    _, data, _ = parse_args(argv=["--config", str(path), "--output_dir", str(tmp_path / "o")])
    assert (data.train_files, data.block_size) == (["a.txt"], 8)
    path.write_text("datasets: {name: a, files: x.txt}\n")
    _, data, _ = parse_args(argv=["--config", str(path), "--output_dir", str(tmp_path / "o")])
    assert data.datasets == ['{"name": "a", "files": "x.txt"}']


def test_missing_config_file(tmp_path):
    with pytest.raises(LMKitError, match="--config .*nope.yaml: no such file"):
        parse_args(argv=["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected",
    [(True, True, True), (True, False, True), (False, True, False), (False, False, False)],
)
def test_bf16_defaults_to_what_the_cpu_runs_natively(tmp_path, monkeypatch, amx, avx512_bf16, expected):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    _, _, args = parse_args(argv=["--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert args.bf16 is expected
    assert args.mixed_precision == ("bf16" if expected else "no")
    _, _, args = parse_args(argv=["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "auto"])
    assert args.bf16 is expected


def test_no_accelerator_means_a_cpu_run_before_transformers_decides_the_device(tmp_path, monkeypatch):
    # use_cpu is settled in LMTrainingArguments.__post_init__, before TrainingArguments' own: that one caches the
    # device and pin_memory from it, so a later change (in the recipe's set-up) would come too late.
    import torch

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    _, _, args = parse_args(argv=["--output_dir", str(tmp_path)])
    assert args.use_cpu is True and args.device.type == "cpu" and args.dataloader_pin_memory is False
    assert args.bf16 is True and args.mixed_precision == "bf16"  # bf16 auto was asked of the CPU, which has AMX


@pytest.mark.parametrize(
    "argv, bf16, fp16",
    [(["--bf16"], True, False), (["--bf16", "false"], False, False), (["--fp16", "true"], False, True)],
)
def test_explicit_precision_wins_over_auto(tmp_path, monkeypatch, argv, bf16, fp16):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    _, _, args = parse_args(argv=["--output_dir", str(tmp_path), "--use_cpu", "true", *argv])
    assert (args.bf16, args.fp16) == (bf16, fp16)


def test_bf16_rejects_other_words(tmp_path):
    with pytest.raises(LMKitError, match="--bf16"):
        parse_args(argv=["--output_dir", str(tmp_path), "--bf16", "maybe"])


def test_compile_on_cpu_without_a_compiler_is_one_line(tmp_path, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("no compiler")

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")  # TrainingArguments exports it when compile is on
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(LMKitError, match=r"--torch_compile on a CPU needs a C\+\+ compiler.*--torch_compile false"):
        parse_args(argv=["--output_dir", str(tmp_path), "--use_cpu", "true", "--torch_compile", "true"])


@pytest.mark.parametrize(
    "given, compiled, auto", [([], False, True), (["--torch_compile", "auto"], False, True),
                              (["--torch_compile", "false"], False, False), (["--torch_compile", "true"], True, False)]
)  # fmt: skip
def test_torch_compile_auto_stays_off_until_the_recipe_decides(tmp_path, dynamo_env, given, compiled, auto):
    # auto is decided by the recipe once the run's length is known (lmkit.perf.resolve_torch_compile)
    _, _, args = parse_args(argv=["--output_dir", str(tmp_path), "--use_cpu", "true", *given])
    assert (args.torch_compile, args.torch_compile_auto) == (compiled, auto)
    with pytest.raises(LMKitError, match="--torch_compile"):
        parse_args(argv=["--output_dir", str(tmp_path), "--torch_compile", "sometimes"])


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "recipes" / "configs").glob("*.yaml")))
def test_every_preset_parses_into_its_recipes_groups(tmp_path, monkeypatch, preset):
    from dataclasses import fields

    import yaml

    from lmkit.args import DataArguments, LMTrainingArguments, ModelArguments
    from lmkit.dpo_args import PreferenceArguments
    from lmkit.finetune_args import FinetuneArguments

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")  # a compiling preset exports it for the process
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "default")
    groups = (ModelArguments, DataArguments, LMTrainingArguments)  # recipes/pretrain.py
    if preset.startswith("sft"):  # recipes/finetune.py
        groups = (ModelArguments, DataArguments, FinetuneArguments, LMTrainingArguments)
    if preset.startswith("dpo"):  # recipes/dpo.py
        groups = (ModelArguments, DataArguments, FinetuneArguments, PreferenceArguments, LMTrainingArguments)
    path = REPO / "recipes" / "configs" / preset
    # --use_cpu: the GPU presets ask for bf16, which TrainingArguments refuses on a machine without a bf16 GPU
    parsed = parse_args(groups, argv=["--config", str(path), "--use_cpu", "true", "--output_dir", str(tmp_path)])
    owner = {f.name: group for group in parsed for f in fields(group)}
    for key, want in yaml.safe_load(path.read_text()).items():
        if key == "output_dir":  # the command line wins
            continue
        got = getattr(owner[key], key)
        got = getattr(got, "value", got)  # TrainingArguments turns strategies and schedules into enums
        if key == "report_to":
            want = [] if want == "none" else [want]
        assert got == want, f"{preset}: {key} is {got!r}, the preset says {want!r}"


# -- explicit fields and defaults that follow the model -----------------------------------------------------------


def test_explicit_fields_are_the_users_flags_and_config_not_the_recipe_preset(tmp_path):
    from lmkit.args import explicit_fields

    preset = tmp_path / "preset.yaml"
    preset.write_text("block_size: 512\nlearning_rate: 1.0e-3\nhidden_size: 96\nnum_attention_heads: 3\n")
    argv = ["--output_dir", str(tmp_path), "--max-steps", "3", "--no_cpu_allocator_reuse", "--seed=5"]
    model_args, data_args, args = parse_args(argv=argv, default_config=preset)
    assert (data_args.block_size, args.learning_rate, args.max_steps, args.seed) == (512, 1e-3, 3, 5)
    assert explicit_fields(model_args) == frozenset()
    assert explicit_fields(data_args) == frozenset()
    assert explicit_fields(args) == {"output_dir", "max_steps", "cpu_allocator_reuse", "seed"}

    mine = tmp_path / "user" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("block_size: 64\nvalidation_split: 0.1\n")
    model_args, data_args, args = parse_args(
        argv=["--config", str(mine), "--hidden_size", "64"], default_config=preset
    )
    assert explicit_fields(data_args) == {"block_size", "validation_split"}  # a --config the user passed
    assert explicit_fields(model_args) == {"hidden_size"}
    assert explicit_fields(args) == frozenset()
    assert data_args.block_size == 64 and args.learning_rate == 3e-4  # the preset is not read at all then

    other_preset = tmp_path / "lora.yaml"  # a shipped preset passed with --config sets defaults too
    other_preset.write_text("block_size: 1024\n")
    _, data_args, _ = parse_args(argv=["--config", str(other_preset), "--seed", "1"], default_config=preset)
    assert data_args.block_size == 1024 and explicit_fields(data_args) == frozenset()


def test_fit_block_size_default_follows_explicit_errors(tmp_path, caplog):
    import logging

    from lmkit.args import DataArguments, fit_block_size

    preset = tmp_path / "preset.yaml"
    preset.write_text("block_size: 512\n")
    _, data_args, _ = parse_args(argv=[], default_config=preset)
    with caplog.at_level(logging.INFO, logger="lmkit"):
        fit_block_size(data_args, 128, "the model's max_position_embeddings")
    assert data_args.block_size == 128
    assert caplog.messages == [
        "--block_size 512 (a default) exceeds the model's max_position_embeddings 128: using --block_size 128"
    ]
    fit_block_size(data_args, None, "the model's max_position_embeddings")  # a model without a limit: kept
    assert data_args.block_size == 128

    _, data_args, _ = parse_args(argv=["--block_size", "512"], default_config=preset)
    with pytest.raises(LMKitError, match=r"^--block_size 512 exceeds the model's max_position_embeddings 128$"):
        fit_block_size(data_args, 128, "the model's max_position_embeddings")
    with pytest.raises(LMKitError, match="--block_size 256 exceeds"):  # built directly: every field is explicit
        fit_block_size(DataArguments(block_size=256), 128, "the model's max_position_embeddings")


def test_fit_evaluation_turns_default_evaluation_off_and_refuses_asked_for_evaluation(tmp_path):
    from lmkit.args import fit_evaluation

    preset = tmp_path / "preset.yaml"
    preset.write_text("eval_strategy: steps\neval_on_start: true\n")
    *_, args = parse_args(argv=["--output_dir", str(tmp_path)], default_config=preset)
    fit_evaluation(args, "--validation_split 0.0 holds out no validation data")
    assert (args.eval_strategy, args.eval_on_start, args.do_eval) == ("no", False, False)
    for flags, message in [
        (["--eval_strategy", "steps"], "--eval_strategy steps: --validation_split 0.0 holds out"),
        (["--eval_on_start", "true"], "--eval_on_start True: --validation_split 0.0 holds out"),
    ]:
        *_, args = parse_args(argv=["--output_dir", str(tmp_path), *flags], default_config=preset)
        with pytest.raises(LMKitError, match=message):
            fit_evaluation(args, "--validation_split 0.0 holds out no validation data")
    *_, args = parse_args(argv=["--output_dir", str(tmp_path), "--eval_strategy", "no"], default_config=preset)
    fit_evaluation(args, "--validation_split 0.0 holds out no validation data")  # asked for no evaluation: fine
    assert args.eval_on_start is False


def test_fit_length_fits_any_length_field_and_check_block_size_adds_the_streaming_rule(tmp_path):
    from lmkit.args import DataArguments, LMTrainingArguments, check_block_size, fit_length
    from lmkit.dpo_args import PreferenceArguments

    (pref,) = parse_args((PreferenceArguments,), argv=[])  # max_length a default: it follows the model
    default = pref.max_length
    fit_length(pref, "max_length", default - 1, "the model's max_position_embeddings")
    assert pref.max_length == default - 1
    (pref,) = parse_args((PreferenceArguments,), argv=["--max_length", "512"])
    with pytest.raises(LMKitError, match=r"^--max_length 512 exceeds the model's max_position_embeddings 256$"):
        fit_length(pref, "max_length", 256, "the model's max_position_embeddings")

    args = LMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=-1)
    with pytest.raises(LMKitError, match="^--streaming needs --max_steps"):
        check_block_size(DataArguments(streaming=True), args, None, "the model's max_position_embeddings")
    data = DataArguments(block_size=256)  # built directly: explicit
    with pytest.raises(LMKitError, match=r"^--block_size 256 exceeds the model's --max_position_embeddings 128$"):
        check_block_size(data, args, 128, "the model's --max_position_embeddings")
    check_block_size(data, args, None, "the model's max_position_embeddings")  # no limit: kept
    assert data.block_size == 256


def test_check_block_size_refuses_evaluation_when_the_flags_hold_out_no_validation_data(tmp_path, caplog):
    from lmkit.args import check_block_size

    def run(*flags):
        _, data, args = parse_args(argv=["--output_dir", str(tmp_path), "--validation_split", "0", *flags])
        check_block_size(data, args, None, "the model's max_position_embeddings")
        return args

    with pytest.raises(LMKitError) as err:
        run("--eval_strategy", "steps")
    assert str(err.value) == (
        "--eval_strategy steps: --validation_split 0.0 holds out no validation data, so there is nothing to evaluate"
    )
    with caplog.at_level("INFO", logger="lmkit.args"):
        args = run()  # evaluation only a default asked for: turned off
    assert (args.eval_strategy, args.eval_on_start) == ("no", False)
    assert "--validation_split 0.0 holds out no validation data: no evaluation (--eval_strategy no)" in caplog.messages
    # validation data may still come: from --validation_files, or a hub dataset's "validation" split
    assert run("--eval_strategy", "steps", "--validation_files", "v.txt").eval_strategy == "steps"
    assert run("--eval_strategy", "steps", "--dataset_name", "someone/corpus").eval_strategy == "steps"


def test_label_smoothing_is_refused_because_the_smoother_would_shift_targets_twice(tmp_path):
    with pytest.raises(LMKitError, match=r"^--label_smoothing_factor 0.1 is not supported"):
        parse_args(argv=["--output_dir", str(tmp_path), "--label_smoothing_factor", "0.1"])
    _, _, args = parse_args(argv=["--output_dir", str(tmp_path), "--label_smoothing_factor", "0"])
    assert args.label_smoothing_factor == 0
