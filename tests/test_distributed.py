"""Scale-out: every accelerate config runs for real as 2 processes on the CPU (gloo; DeepSpeed's CPU accelerator).

One launch per mode, several checks on its outputs. All launches train the same tiny model (2 layers, 64 dims,
char tokenizer) for one epoch of a small corpus in bf16 with gradient checkpointing, from the same seed:

- parity: 2 ranks x 4 rows reproduce the single-process loss curve of 1 rank x 8 rows (same rows per step);
- data: the two ranks' rows are disjoint and together are exactly the single process's epoch; only rank 0
  tokenizes, rank 1 loads its cache;
- ZeRO-3 and FSDP save one full model that `from_pretrained` loads and that gives the sharded model's logits;
- ZeRO-3 resumes from its checkpoint onto the same curve; two launchers as two "machines" end identical.

Parity tolerance, `LOSS_ATOL` = 5e-3 on the 21 per-step losses (around 4.5): what differs between the runs is
only the order of floating-point reductions (a gradient summed over 8 rows vs two sums of 4, all-reduced) and,
for DeepSpeed, bf16 weights instead of bf16 autocast over fp32 weights. Measured worst step over the epoch:
DDP/FSDP/two machines 3.5e-4, ZeRO-1/2/3 1.4e-3, so 5e-3 leaves 3.5x headroom. A wrong batch composition is
far outside it: the same init fed another order of the same rows differs by up to 8e-2 (median 3e-2) per step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmkit.args import BUNDLED_CORPUS, LMTrainingArguments
from lmkit.distributed import (
    check_launch_config,
    deepspeed_config_problems,
    extension_build_dir,
    prebuild_deepspeed_ops,
    validate_distributed,
)
from lmkit.distributed import (
    main as distributed_main,
)
from lmkit.errors import LMKitError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"
LAUNCH = REPO / "tests" / "_launch_pretrain.py"
LOSS_ATOL = 5e-3
# Logits of the saved model vs the sharded one. ZeRO-3 saves the bf16 weights it computed with: exact. FSDP
# computes in bf16 (mixed precision) from fp32 weights and saves fp32: bf16 rounding (2^-8 relative) of logits ~1.
LOGITS_ATOL = {"deepspeed_zero3": 1e-5, "fsdp": 2e-2}
PER_DEVICE, WORLD = 4, 2
LAUNCH_TIMEOUT_S = 300
_spec = importlib.util.spec_from_file_location("_launch_pretrain", LAUNCH)
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)
PROBE_INPUT = _harness.PROBE_INPUT

multiprocess = pytest.mark.multiprocess


# -- launching ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(record: Path | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if record is not None:
        env["LMKIT_TEST_RECORD"] = str(record)
    return env


def _run(cmd: list[str], record: Path | None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(record), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def accelerate(config: str, *args: str, num_processes: int = WORLD) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(_free_port()),
        str(LAUNCH),
        *args,
    ]


class Run:
    """What one launch left behind: per-step losses, each rank's record, the saved model."""

    def __init__(self, out: Path, record: Path):
        self.out, self.record = out, record
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        self.losses = {h["step"]: h["loss"] for h in history if "loss" in h}
        self.ranks = [json.loads(p.read_text()) for p in sorted(record.glob("rank*.json"))]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="session")
def recipe_config(workdir) -> Path:
    corpus = workdir / "corpus.txt"
    corpus.write_text(BUNDLED_CORPUS.read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    config = {
        "train_files": [str(corpus)],
        "tokenizer": "char",
        "vocab_size": 128,
        "block_size": 32,
        "validation_split": 0.05,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        # one epoch; rows that do not fill a last global batch of 8 are dropped, so every row is seen once
        "per_device_train_batch_size": PER_DEVICE,
        "num_train_epochs": 1,
        "max_steps": -1,
        "dataloader_drop_last": True,
        "learning_rate": 1.0e-3,
        "warmup_steps": 0,
        "logging_steps": 1,
        "bf16": True,
        "activation_checkpointing": True,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "sample_prompt": "",
        "eval_on_start": False,
        "per_device_eval_batch_size": 16,
    }
    path = workdir / "tiny.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="session")
def ds_ops() -> None:
    """DeepSpeed's CPU comm op, compiled here once: the launched ranks then only load it (see prebuild docs)."""
    prebuild_deepspeed_ops()


def _launch(workdir: Path, name: str, cmd_head: list[str], recipe_config: Path, *extra: str) -> Run:
    out, record = workdir / name, workdir / f"{name}.record"
    record.mkdir()
    cache = workdir / f"{name}.cache"  # a fresh tokenization cache per launch: rank 0 must build it
    _run(
        [*cmd_head, "--config", str(recipe_config), "--output_dir", str(out), "--cache_dir", str(cache), *extra],
        record,
    )
    return Run(out, record)


@pytest.fixture(scope="session")
def reference(workdir, recipe_config) -> Run:
    """One process, 8 rows per step: the curve every 2 x 4 launch must reproduce."""
    return _launch(
        workdir,
        "single",
        [sys.executable, str(LAUNCH)],
        recipe_config,
        "--per_device_train_batch_size",
        str(WORLD * PER_DEVICE),
    )


def _assert_parity(run: Run, reference: Run) -> None:
    assert len(run.losses) == len(reference.losses) >= 15
    steps = sorted(reference.losses)
    got = torch.tensor([run.losses[s] for s in steps])
    want = torch.tensor([reference.losses[s] for s in steps])
    torch.testing.assert_close(got, want, atol=LOSS_ATOL, rtol=0)
    assert got[-3:].mean() < got[:3].mean() - 0.2  # and it learned something


def _assert_disjoint_shards(run: Run, reference: Run) -> None:
    (rank0, rank1), (single,) = run.ranks, reference.ranks
    assert len(rank0["samples"]) == len(rank1["samples"]) == len(single["samples"]) // WORLD
    assert len(set(rank0["samples"])) == len(rank0["samples"])  # no row twice on a rank within the epoch
    assert not set(rank0["samples"]) & set(rank1["samples"])  # no row on both ranks
    assert sorted(rank0["samples"] + rank1["samples"]) == sorted(single["samples"])  # together: the whole epoch


def _assert_full_model_saved(run: Run, mode: str) -> None:
    from lmkit import LMForCausalLM

    model = LMForCausalLM.from_pretrained(run.out).eval()  # in the dtype it was saved in
    reference_model = LMForCausalLM(model.config)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference_model.parameters())
    for name, param in model.named_parameters():  # ZeRO-3's classic failure: empty or placeholder tensors
        assert param.float().abs().sum() > 0, name
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE_INPUT)).logits.float()[0]
    sharded = torch.tensor(run.ranks[0]["logits"])
    torch.testing.assert_close(logits, sharded, atol=LOGITS_ATOL[mode], rtol=0)


# -- the modes ---------------------------------------------------------------------------------------------------
@multiprocess
def test_ddp_accelerate_parity_and_data_sharding(workdir, recipe_config, reference):
    run = _launch(workdir, "ddp", accelerate("cpu.yaml"), recipe_config)
    _assert_parity(run, reference)
    _assert_disjoint_shards(run, reference)
    rank0, rank1 = run.ranks
    assert rank0["world_size"] == WORLD
    assert rank0["tokenize_batches"] > 0 and rank1["tokenize_batches"] == 0  # rank 1 loaded rank 0's cache


STREAM_STEPS = 10


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@multiprocess
def test_streaming_ranks_get_disjoint_batches_of_the_single_process_stream(workdir, recipe_config):
    # A stream has no length to shard by index: accelerate reads it on rank 0 and hands each rank its slice
    # (dispatch_batches), so 2 x 4 rows per step are exactly the rows one process takes 8 at a time.
    stream = ["--streaming", "true", "--max_steps", str(STREAM_STEPS), "--validation_split", "0.3"]
    single = _launch(
        workdir, "stream-single", [sys.executable, str(LAUNCH)], recipe_config, *stream,
        "--per_device_train_batch_size", str(WORLD * PER_DEVICE),
    )  # fmt: skip
    run = _launch(workdir, "stream-ddp", accelerate("cpu.yaml"), recipe_config, *stream)
    (rank0, rank1), (reference,) = run.ranks, single.ranks
    assert len(rank0["samples"]) == len(rank1["samples"]) == STREAM_STEPS * PER_DEVICE
    assert not set(rank0["samples"]) & set(rank1["samples"])
    assert sorted(rank0["samples"] + rank1["samples"]) == sorted(reference["samples"])
    steps = sorted(single.losses)
    torch.testing.assert_close(
        torch.tensor([run.losses[s] for s in steps]), torch.tensor([single.losses[s] for s in steps]),
        atol=LOSS_ATOL, rtol=0,
    )  # fmt: skip


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@multiprocess
def test_zero1_parity(workdir, recipe_config, reference, ds_ops):
    run = _launch(workdir, "zero1", accelerate("deepspeed_zero1.yaml"), recipe_config)
    _assert_parity(run, reference)
    _assert_disjoint_shards(run, reference)


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@multiprocess
def test_zero2_torchrun_parity(workdir, recipe_config, reference, ds_ops):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(_free_port()),
        str(LAUNCH),
    ]
    run = _launch(workdir, "zero2", torchrun, recipe_config, "--deepspeed", str(CONFIGS / "ds_zero2.json"))
    _assert_parity(run, reference)
    _assert_disjoint_shards(run, reference)


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@multiprocess
def test_zero3_parity_consolidated_save_and_resume(workdir, recipe_config, reference, ds_ops):
    run = _launch(
        workdir,
        "zero3",
        accelerate("deepspeed_zero3.yaml"),
        recipe_config,
        "--save_strategy",
        "steps",
        "--save_steps",
        "10",
        # the closing sample on rank 0 after the others have finished: it must neither partition the model it
        # reloads nor sync its decoding steps across ranks (before lmkit.generation._zero3_off, exit status 1)
        "--sample_prompt",
        "ROMEO:",
        "--sample_max_new_tokens",
        "8",
    )
    _assert_parity(run, reference)
    _assert_full_model_saved(run, "deepspeed_zero3")
    checkpoint = run.out / "checkpoint-10"
    assert any(checkpoint.glob("global_step10/*optim_states.pt"))  # DeepSpeed's own sharded state, per rank

    # Resume under the offload config: the same ZeRO-3 checkpoint, optimizer state now kept in CPU memory.
    resumed = _launch(
        workdir,
        "zero3_resumed",
        accelerate("deepspeed_zero3_offload.yaml"),
        recipe_config,
        "--resume_from_checkpoint",
        str(checkpoint),
    )
    # It trained only steps 11.. (each rank on exactly the rows the uninterrupted run had there) ...
    for rank_resumed, rank_full in zip(resumed.ranks, run.ranks, strict=True):
        assert rank_resumed["samples"] == rank_full["samples"][10 * PER_DEVICE :]
    # ... and the curve continues: the same losses as the run that was never interrupted.
    steps = [s for s in sorted(resumed.losses) if s > 10]
    assert steps == [s for s in sorted(run.losses) if s > 10]
    torch.testing.assert_close(
        torch.tensor([resumed.losses[s] for s in steps]),
        torch.tensor([run.losses[s] for s in steps]),
        atol=LOSS_ATOL,
        rtol=0,
    )


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@multiprocess
def test_zero3_finetune_adds_chat_tokens_and_saves_the_resized_model(workdir, ds_ops):
    # from_pretrained under ZeRO-3 builds the model sharded (zero.Init); the ChatML markers then resize the
    # sharded embeddings (transformers gathers them) and the saved model is the full, resized one.
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lmkit.tokenizer import build_tokenizer

    base = workdir / "ft-base"
    tok = build_tokenizer("char", ["abcdefg reverse\n"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    words = ["abc", "bad", "cafe", "dge", "fed", "gab", "ace", "bead"] * 6
    rows = [{"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in words]  # fmt: skip
    data = workdir / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = workdir / "ft-zero3"
    _run(
        accelerate("deepspeed_zero3.yaml")[:-1] + [str(REPO / "recipes" / "finetune.py"),
        "--model_name_or_path", str(base), "--train_files", str(data), "--output_dir", str(out), "--block_size", "64",
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--bf16", "true", "--disable_tqdm", "true"],
        None,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    n = len(tok) + 2  # <|im_start|>, <|im_end|>
    assert model.get_input_embeddings().weight.shape == (n, 32)
    assert model.get_output_embeddings().weight.shape == (n, 32)
    assert all(p.abs().sum() > 0 for p in model.parameters())  # not ZeRO-3's empty placeholders


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@multiprocess
def test_fsdp_parity_and_consolidated_save(workdir, recipe_config, reference):
    run = _launch(workdir, "fsdp", accelerate("fsdp.yaml"), recipe_config)
    _assert_parity(run, reference)
    _assert_disjoint_shards(run, reference)
    _assert_full_model_saved(run, "fsdp")


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@multiprocess
def test_two_machines_end_with_identical_weights(workdir, recipe_config, reference):
    """Two launchers on this machine act as machine 0 and machine 1 of multi_node.yaml (one process each)."""
    port = _free_port()
    out, record = workdir / "multinode", workdir / "multinode.record"
    record.mkdir()
    procs = []
    for machine in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "multi_node.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            str(LAUNCH),
            "--config",
            str(recipe_config),
            "--output_dir",
            str(out),
            "--cache_dir",
            str(workdir / "mn.cache"),
            "--per_device_train_batch_size",
            str(PER_DEVICE),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=_env(record), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-6000:]
    run = Run(out, record)
    assert [r["world_size"] for r in run.ranks] == [WORLD, WORLD]
    assert run.ranks[0]["param_digest"] == run.ranks[1]["param_digest"]
    _assert_parity(run, reference)


# -- validation: bad input fails before anything is built ----------------------------------------------------------
def _args(**overrides) -> SimpleNamespace:
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default for f in fields(LMTrainingArguments) if f.default is not MISSING}
    defaults.update(deepspeed=None, world_size=1)
    defaults.update(overrides)
    return SimpleNamespace(**defaults)


def _ds_file(tmp_path: Path, **changes) -> Path:
    config = json.loads((CONFIGS / "ds_zero3.json").read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def test_shipped_deepspeed_configs_agree_with_any_training_arguments():
    for path in sorted(CONFIGS.glob("ds_*.json")):
        config = json.loads(path.read_text())
        for world in (1, 2, 3, 8):
            assert deepspeed_config_problems(config, _args(), world, path.name) == [], path


@pytest.mark.parametrize(
    ("changes", "args", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 16},
            {},
            "sets train_micro_batch_size_per_gpu 16 but --per_device_train_batch_size is 8",
        ),
        ({"gradient_clipping": 0.5}, {}, "sets gradient_clipping 0.5 but --max_grad_norm is 1.0"),
        (
            {"gradient_accumulation_steps": 4},
            {},
            "sets gradient_accumulation_steps 4 but --gradient_accumulation_steps is 1",
        ),
        ({"bf16__enabled": True}, {"bf16": False}, "sets bf16.enabled True but --bf16 is False"),
        ({"zero_optimization__stage": 4}, {}, "zero_optimization.stage 4 is not a ZeRO stage (0, 1, 2 or 3)"),
        ({"train_batch_size": 30}, {"world_size": 4}, "train_batch_size 30 is not divisible by the world size 4"),
        (
            {"train_batch_size": 32},
            {"world_size": 2},
            "sets train_batch_size 32 but 2 processes x --per_device_train_batch_size 8",
        ),
        ({"scheduler__type": "WarmupDecayLR"}, {}, "sets scheduler WarmupDecayLR but --lr_scheduler_type is cosine"),
        ({"zero_optimization__stage3_gather_16bit_weights_on_model_save": False}, {}, "saves an empty model"),
        ({"optimizer__params__lr": 0.1}, {}, "sets optimizer.params.lr 0.1 but --learning_rate is 0.0003"),
    ],
)
def test_deepspeed_config_contradicting_training_arguments_is_one_clear_error(tmp_path, changes, args, message):
    path = _ds_file(tmp_path, **changes)
    with pytest.raises(LMKitError) as err:
        validate_distributed(_args(deepspeed=str(path), per_device_train_batch_size=8, **args))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_deepspeed_config_from_accelerate_env_is_checked(tmp_path, monkeypatch):
    path = _ds_file(tmp_path, zero_optimization__stage="three")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(LMKitError, match=r"deepspeed_config_file .*stage 'three' is not a ZeRO stage"):
        validate_distributed(_args())
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(LMKitError, match="missing.json: no such file"):
        validate_distributed(_args())


def test_offload_without_ds_optimizer_needs_the_force_flag_off(tmp_path):
    path = _ds_file(tmp_path, zero_optimization__offload_optimizer={"device": "cpu"})
    with pytest.raises(LMKitError, match="zero_force_ds_cpu_optimizer"):
        validate_distributed(_args(deepspeed=str(path)))
    validate_distributed(_args(deepspeed=str(CONFIGS / "ds_zero3_offload.json")))


def test_multi_node_config_without_main_process_ip(capsys):
    with pytest.raises(LMKitError, match="2 machines but no main_process_ip; pass --main_process_ip"):
        check_launch_config(CONFIGS / "multi_node.yaml", machine_rank=1)
    config = check_launch_config(CONFIGS / "multi_node.yaml", main_process_ip="10.0.0.1", machine_rank=1)
    assert config["main_process_ip"] == "10.0.0.1"
    with pytest.raises(SystemExit) as exit_info:
        distributed_main(["check", "--config_file", str(CONFIGS / "multi_node.yaml")])
    assert exit_info.value.code == 2
    assert "lmkit: error: --config_file" in capsys.readouterr().err


def test_world_size_not_dividing_processes_per_machine():
    with pytest.raises(LMKitError, match="num_processes 3 is not divisible by num_machines 2"):
        check_launch_config(CONFIGS / "multi_node.yaml", main_process_ip="10.0.0.1", num_processes=3)


def test_every_shipped_accelerate_config_is_documented_and_valid():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert names == {
        "cpu.yaml",
        "single_gpu.yaml",
        "ddp.yaml",
        "deepspeed_zero1.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml",
        "fsdp.yaml",
        "multi_node.yaml",
    }
    cwd = os.getcwd()
    os.chdir(REPO)  # deepspeed_config_file paths are relative to the repo root
    try:
        for name in sorted(names):
            text = (CONFIGS / name).read_text()
            assert text.startswith("# "), f"{name} must open with a comment saying when to use it"
            check_launch_config(CONFIGS / name, main_process_ip="10.0.0.1")
    finally:
        os.chdir(cwd)


def test_stale_build_lock_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A rank killed while compiling leaves torch's build lock; the next run would poll it forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = extension_build_dir("deepspeed_shm_comm") / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(LMKitError, match=r"deepspeed_shm_comm/lock is left from an interrupted DeepSpeed op build"):
        prebuild_deepspeed_ops(["ShareMemCommBuilder"])
    with pytest.raises(LMKitError, match="interrupted DeepSpeed op build"):
        validate_distributed(_args(deepspeed=str(CONFIGS / "ds_zero2.json")))
