"""Speed levers keep the loss of the plain fp32 path; FLOPs, MFU, peak lookup and the trainer's speed logs.

Each lever test trains a tiny model for a few steps with the lever on and with the plain path (fp32, eager
attention, unfused AdamW, full logits) from the same init and data, and compares the losses step by step.
"""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cpu_args, tiny_config
from datasets import Dataset
from transformers import GPT2Config, LlamaConfig, TrainerCallback

from lmkit import LMConfig, LMForCausalLM
from lmkit.collator import CausalLMCollator
from lmkit.perf import (
    DataWaitTimer,
    SpeedMeter,
    gpu_peak_flops,
    mfu,
    resolve_peak_flops,
    training_flops_per_token,
    transformer_training_flops_per_token,
)
from lmkit.trainer import LMTrainer

VOCAB, T, B, STEPS = 97, 16, 4, 6


def perf_config(**overrides) -> LMConfig:
    """The shared tiny model, 64 wide (SwiGLU 192) for T-token blocks, on the plain path: eager attention."""
    config = tiny_config(VOCAB, hidden_size=64, intermediate_size=None, max_position_embeddings=T)
    config._attn_implementation = "eager"
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def train_logs(tmp_path, model_overrides=None, **arg_overrides) -> tuple[LMForCausalLM, list[dict]]:
    """Train a tiny model (same init and data every call) under the given settings; the model and every log."""
    torch.manual_seed(0)
    model = LMForCausalLM(perf_config(**(model_overrides or {})))
    rows = torch.randint(1, VOCAB, (B * STEPS, T + 1), generator=torch.Generator().manual_seed(1)).tolist()
    logged: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    settings = dict(
        per_device_train_batch_size=B, max_steps=STEPS, logging_steps=1, learning_rate=1e-2, warmup_steps=0, seed=0,
        optim="adamw_torch", peak_flops=1e9, cpu_allocator_reuse=False,
    )  # fmt: skip
    trainer = LMTrainer(
        model=model,
        args=cpu_args(tmp_path, **{**settings, **arg_overrides}),
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        data_collator=CausalLMCollator(pad_token_id=0),
        callbacks=[Record()],
    )
    trainer.train()
    return model, logged


def train_losses(tmp_path, model_overrides=None, **arg_overrides) -> list[float]:
    """Per-step training losses of a tiny model (same init and data every call) under the given settings."""
    _, logged = train_logs(tmp_path, model_overrides, **arg_overrides)
    losses = [log["loss"] for log in logged if "loss" in log]
    assert len(losses) == STEPS
    return losses


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory) -> list[float]:
    return train_losses(tmp_path_factory.mktemp("plain"))


def assert_losses_close(losses: list[float], reference: list[float], rtol: float) -> None:
    for step, (got, want) in enumerate(zip(losses, reference, strict=True)):
        assert abs(got - want) <= rtol * want, f"step {step}: {got} vs plain fp32 {want} (rtol {rtol})"


# -- one test per lever: loss within a stated tolerance of the plain fp32 path -----------------------------------


def test_bf16_autocast_within_2_percent(tmp_path, plain_losses):
    # bf16 matmuls with fp32 norms, softmax and loss: 8 mantissa bits, so per-step losses agree to ~1%.
    assert_losses_close(train_losses(tmp_path, bf16=True), plain_losses, rtol=2e-2)


def test_fused_adamw_within_1e_4(tmp_path, plain_losses):
    # Same update rule, one fused kernel; only the order of float operations differs.
    assert_losses_close(train_losses(tmp_path, optim="adamw_torch_fused"), plain_losses, rtol=1e-4)


def test_sdpa_within_1e_4(tmp_path, plain_losses):
    assert_losses_close(train_losses(tmp_path, {"_attn_implementation": "sdpa"}), plain_losses, rtol=1e-4)


def test_chunked_loss_within_1e_5(tmp_path, plain_losses):
    # Chunk of 16 tokens over 64 per batch: four fused LM-head + CE chunks under checkpointing, then one chunk only.
    assert_losses_close(train_losses(tmp_path, {"loss_chunk_size": 16}), plain_losses, rtol=1e-5)
    assert_losses_close(train_losses(tmp_path, {"loss_chunk_size": 1024}), plain_losses, rtol=1e-5)


def test_chunked_loss_gradients_match_full_logits():
    torch.manual_seed(0)
    model = LMForCausalLM(perf_config()).train()
    ids = torch.randint(1, VOCAB, (B, T + 1))
    grads = {}
    for chunk in (0, 16):
        model.zero_grad()
        model.config.loss_chunk_size = chunk
        model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).loss.backward()
        grads[chunk] = [p.grad.clone() for p in model.parameters()]
    for full, chunked in zip(grads[0], grads[16], strict=True):
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@pytest.mark.slow  # inductor compiles for ~20-45 s on a 2-core CPU
def test_torch_compile_within_1e_4():
    # What --torch_compile does to the model (Trainer -> accelerate -> torch.compile), on one layer to keep the
    # inductor compile short: the loss and every gradient of two steps match eager within float reordering.
    torch.manual_seed(0)
    eager = LMForCausalLM(perf_config(num_hidden_layers=1, _attn_implementation="sdpa")).train()
    compiled_model = copy.deepcopy(eager)
    try:
        compiled = torch.compile(compiled_model)
        ids = torch.randint(1, VOCAB, (B, T + 1))
        for _ in range(2):
            got = compiled(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).loss
            got.backward()
            want = eager(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).loss
            want.backward()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # no C++ toolchain: the lever is unavailable, not wrong
        pytest.skip(f"torch.compile unavailable: {err}")
    for p_eager, p_compiled in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6)


# -- FLOPs and MFU arithmetic ------------------------------------------------------------------------------------


def test_flops_per_token_lmkit_exact():
    # Per layer: q 64x64, k and v 64x32 each, o 64x64, SwiGLU 3 x 64x192 -> 4096+2048+2048+4096+36864 = 49,152.
    # N = 2 x 49,152 + head 64 x 97 = 104,512; 6N = 627,072; attention 12 x 2 layers x 64 x 16 = 24,576.
    assert training_flops_per_token(perf_config(), seq_len=16) == 651_648


def test_flops_per_token_llama_and_gpt2_exact():
    llama = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )  # 4 x 32x32 + 3 x 32x64 = 10,240; + head 3,200 -> 6 x 13,440 = 80,640; attention 12 x 32 x 8 = 3,072
    assert training_flops_per_token(llama, seq_len=8) == 83_712
    gpt2 = GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_inner=None)
    # 4 x 32x32 + 2 x 32x128 = 12,288; + head 3,200 -> 6 x 15,488 = 92,928; attention 3,072
    assert training_flops_per_token(gpt2, seq_len=8) == 96_000


def test_transformer_flops_formula_is_6n_plus_attention():
    kw = dict(num_layers=2, hidden_size=8, q_dim=8, kv_dim=8, intermediate_size=16, mlp_matrices=2, vocab_size=10)
    assert transformer_training_flops_per_token(**kw, seq_len=0) == 6 * (2 * (4 * 64 + 2 * 128) + 80)
    assert (
        transformer_training_flops_per_token(**kw, seq_len=5) - transformer_training_flops_per_token(**kw, seq_len=0)
        == 12 * 2 * 8 * 5
    )


def test_mfu_arithmetic():
    assert mfu(tokens_per_second=1000, flops_per_token=6e6, peak_flops=12e9) == 0.5
    assert math.isclose(mfu(2.5e4, 6 * 1.1e9, 989.4e12), 0.16677, rel_tol=1e-4)
    with pytest.raises(ValueError):
        mfu(1, 1, 0)


def test_gpu_peak_table_lookup():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156.0e12
    assert gpu_peak_flops("NVIDIA A10G", torch.bfloat16) == 70.0e12
    assert gpu_peak_flops("Some Future Card", torch.bfloat16) is None


def test_peak_override_and_cpu_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_peak_flops(torch.device("cpu"), torch.float32, override=5e11) == (5e11, "configured")
    peak, source = resolve_peak_flops(torch.device("cpu"), torch.float32)
    assert source == "cpu measured" and 1e8 < peak < 1e14


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import lmkit.perf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []

    def fake_measure(dtype, device):
        measured.append((dtype, str(device), torch.get_num_threads()))
        return 1.5e11 * len(measured)

    monkeypatch.setattr(lmkit.perf, "measure_matmul_peak", fake_measure)
    cache = tmp_path / "lmkit" / "cpu_peak_flops.json"
    cpu = torch.device("cpu")
    assert resolve_peak_flops(cpu, torch.float32) == (1.5e11, "cpu measured")
    assert resolve_peak_flops(cpu, torch.float32) == (1.5e11, f"cpu measured earlier, cached in {cache}")
    assert len(measured) == 1
    assert resolve_peak_flops(cpu, torch.bfloat16) == (3.0e11, "cpu measured")  # another dtype: its own entry
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert resolve_peak_flops(cpu, torch.float32) == (4.5e11, "cpu measured")  # another thread count too
    finally:
        torch.set_num_threads(threads)
    assert resolve_peak_flops(cpu, torch.float32)[0] == 1.5e11
    assert len(measured) == 3 and len(json.loads(cache.read_text())) == 3
    cache.write_text("{not json")  # a damaged cache is measured again and rewritten
    assert resolve_peak_flops(cpu, torch.float32) == (6.0e11, "cpu measured")
    assert resolve_peak_flops(cpu, torch.float32)[0] == 6.0e11


def test_data_wait_timer_fraction():
    timer = DataWaitTimer()
    timer.reset(now=100.0)
    timer.waited = 0.25
    assert timer.fraction(now=102.0) == 0.125
    timer.reset(now=102.0)
    assert timer.waited == 0.0 and timer.fraction(now=103.0) == 0.0


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_speed_meter_logs_exact_numbers_with_a_fake_clock():
    clock = FakeClock(100.0)
    meter = SpeedMeter(torch.device("cpu"), torch.float32, peak_flops=1e9, clock=clock)
    assert not meter.started
    meter.start(tokens_seen=1_000)
    assert meter.started and meter.peak_flops == 1e9
    with meter.waiting_for_data():
        clock.t = 100.5  # half a second fetching
    for _ in range(3):  # 3 x 8 x 16 = 384 tokens x 651,648 FLOPs (test_flops_per_token_lmkit_exact)
        meter.count({"input_ids": torch.zeros(8, 16, dtype=torch.long)}, perf_config())
    meter.count({"input_ids": torch.zeros(16, dtype=torch.long)}, perf_config())  # not (B, T): not counted
    clock.t = 102.0
    # 1,128 - 1,000 tokens in 2 s; 250,232,832 FLOPs / 2 s / 1 GFLOP/s = 0.1251; 0.5 s of 2 s waiting for data
    assert meter.interval_logs(tokens_seen=1_128) == {
        "tokens_per_second": 64.0, "mfu": 0.1251, "mfu_peak_tflops": 0.001, "data_wait_fraction": 0.25,
    }  # fmt: skip
    clock.t = 106.0  # the next interval starts where the last ended: nothing fetched or counted, 4 s
    assert meter.interval_logs(tokens_seen=1_228) == {"tokens_per_second": 25.0, "data_wait_fraction": 0.0}
    meter.count({"input_ids": torch.zeros(8, 16, dtype=torch.long)}, SimpleNamespace(model_type="unknown"))
    meter.count({"input_ids": torch.zeros(8, 16, dtype=torch.long)}, perf_config())  # no MFU once one failed
    clock.t = 107.0
    assert meter.interval_logs(tokens_seen=None) == {"data_wait_fraction": 0.0}  # no token count: no tokens/s


def test_trainer_logs_mfu_and_data_wait(tmp_path):
    model, logged = train_logs(tmp_path, max_steps=4, logging_steps=2)  # peak_flops 1e9: 0.001 TFLOP/s
    steps = [log for log in logged if "loss" in log]
    assert len(steps) == 2
    for log in steps:
        assert log["mfu_peak_tflops"] == 0.001
        # MFU = tokens/s x FLOPs/token / peak over the same interval, so MFU x peak / FLOPs-per-token gives the
        # logged tokens/s back, up to the rounding of both logs (MFU to 4 decimals, tokens/s to 1).
        per_token = training_flops_per_token(model.config, T)
        implied = log["mfu"] * 1e9 / per_token
        assert math.isclose(implied, log["tokens_per_second"], rel_tol=0, abs_tol=0.5e-4 * 1e9 / per_token + 0.05)
        assert 0.0 <= log["data_wait_fraction"] < 1.0


@pytest.mark.parametrize(
    "requested, compile_, cpu, seq_len, expected",
    [
        ("auto", True, True, 256, "eager"),  # compiled CPU, short sequences: inductor's fused math wins
        ("auto", True, True, 257, "sdpa"),
        ("auto", False, True, 64, "sdpa"),  # eager mode: SDPA is never slower
        ("auto", True, False, 64, "sdpa"),  # GPUs: flash / memory-efficient kernels
        ("eager", False, False, 4096, "eager"),  # an explicit choice is kept
        ("flash_attention_2", True, True, 64, "flash_attention_2"),
    ],
)
def test_auto_attention_choice(requested, compile_, cpu, seq_len, expected):
    from types import SimpleNamespace

    from lmkit.perf import resolve_attn_implementation

    args = SimpleNamespace(torch_compile=compile_, use_cpu=cpu)
    assert resolve_attn_implementation(requested, args, seq_len) == expected


# -- the CPU allocator lever: process-wide, so every check runs in a fresh process -------------------------------

_MALLOC_PROBE = """
import ctypes

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

def mmapped_bytes_of_a_16_mib_block():
    import torch
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    block = torch.ones(16 << 20, dtype=torch.uint8)  # above glibc's default 128 KiB mmap threshold
    return libc.mallinfo2().hblkhd - before
"""

_MMAPPED_BYTES = (
    _MALLOC_PROBE
    + """
import sys
from lmkit.perf import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
print(applied, mmapped_bytes_of_a_16_mib_block())
"""
)


def run_python(script: str, *argv: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_allocator_reuse_serves_big_blocks_from_the_heap():
    def mmapped(mode: str) -> tuple[str, int]:
        applied, grown = run_python(_MMAPPED_BYTES, mode).split()
        return applied, int(grown)

    assert mmapped("off") == ("False", pytest.approx(16 << 20, abs=1 << 16))  # default: a fresh mmap per block
    assert mmapped("on") == ("True", 0)  # tuned: carved from the heap, reused after free


# A training recipe's start: prepare_run (set-up, where the allocator is set), then the tiny run of `train_losses`.
# "trainer" skips prepare_run and builds an LMTrainer with the flag on before the probe: it must leave malloc alone.
_RECIPE_START = (
    _MALLOC_PROBE
    + """
import json, sys, tempfile
from pathlib import Path
from lmkit.args import LMTrainingArguments
from lmkit.runtime import prepare_run
from lmkit.trainer import LMTrainer
from test_perf import LMForCausalLM, perf_config, train_losses

mode, out = sys.argv[1], Path(tempfile.mkdtemp())
reuse = mode != "off"
args = LMTrainingArguments(output_dir=str(out / "run"), report_to="none", use_cpu=True, num_threads=1,
                           cpu_allocator_reuse=reuse, disable_tqdm=True, eval_strategy="no")
if mode == "trainer":
    LMTrainer(model=LMForCausalLM(perf_config()), args=args)
    print(json.dumps({"mmapped": mmapped_bytes_of_a_16_mib_block()}))
    sys.exit()
prepare_run(args)
mmapped = mmapped_bytes_of_a_16_mib_block()
losses = train_losses(out / "train", cpu_allocator_reuse=reuse)
print(json.dumps({"mmapped": mmapped, "losses": losses}))
"""
)


@pytest.fixture(scope="module")
def recipe_starts() -> dict[str, tuple[str, dict]]:
    """mode -> (the process's log, its last line as a dict), one fresh process per mode."""
    runs = {}
    for mode in ("on", "off", "trainer"):
        out = run_python(_RECIPE_START, mode)
        runs[mode] = (out, json.loads(out.strip().splitlines()[-1]))
    return runs


ALLOCATOR_LOG = "cpu allocator: freed memory kept for reuse (--cpu_allocator_reuse)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_prepare_run_sets_the_allocator_once_and_logs_it(recipe_starts):
    log, on = recipe_starts["on"]
    assert log.count(ALLOCATOR_LOG) == 1 and on["mmapped"] == 0
    log, off = recipe_starts["off"]  # --no_cpu_allocator_reuse: glibc's default, a fresh mmap per big block
    assert ALLOCATOR_LOG not in log and off["mmapped"] == pytest.approx(16 << 20, abs=1 << 16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_the_trainer_leaves_the_allocator_alone(recipe_starts):
    log, trainer = recipe_starts["trainer"]  # the flag on, no prepare_run: LMTrainer alone changes nothing
    assert ALLOCATOR_LOG not in log and trainer["mmapped"] == pytest.approx(16 << 20, abs=1 << 16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_allocator_reuse_is_exact(recipe_starts):
    # Where a tensor's memory comes from never changes its value: the same run with malloc tuned (proven above
    # by the probe) and with glibc's default gives the same losses to the last bit.
    on, off = recipe_starts["on"][1], recipe_starts["off"][1]
    assert on["mmapped"] == 0 and off["mmapped"] > 0
    assert on["losses"] == off["losses"] and len(on["losses"]) == STEPS


_IMPORTS = (
    _MALLOC_PROBE
    + """
import logging, os, signal, warnings
import datasets, torch, yaml
from transformers import HfArgumentParser, Trainer, TrainingArguments  # their own import-time effects come first
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

def process_state():
    loggers = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers))
               for name in ("", "lmkit", "transformers", "datasets")}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    return dict(os.environ), torch.get_num_threads(), loggers, handlers, list(warnings.filters)

before = process_state()
import lmkit, lmkit.args, lmkit.runtime, lmkit.trainer
after = process_state()
names = ("env vars", "torch threads", "logging", "signal handlers", "warning filters")
assert after == before, [name for name, b, a in zip(names, before, after) if a != b]
print(mmapped_bytes_of_a_16_mib_block())
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_importing_the_training_modules_changes_nothing():
    # tests/test_modeling.py checks `import lmkit` alone; the training modules (trainer, args, runtime) hold the
    # process-wide levers, so their import leaves env vars, threads, logging, signal handlers and malloc as found.
    assert int(run_python(_IMPORTS).split()[-1]) == pytest.approx(16 << 20, abs=1 << 16)


# -- --torch_compile auto: on where the run is long enough for its compile to pay back ---------------------------


def _compile_args(**overrides):
    base = dict(
        torch_compile="auto", torch_compile_auto=True, torch_compile_backend=None, use_cpu=True, world_size=1,
        deepspeed=None, activation_checkpointing=False, bf16=False, max_steps=-1, gradient_accumulation_steps=1,
        per_device_train_batch_size=4, num_train_epochs=1.0,
    )  # fmt: skip
    return SimpleNamespace(**(base | overrides))


@pytest.mark.parametrize(
    "overrides, tflop, amx, compiler, expected, reason",
    [
        ({"bf16": True}, 30, True, True, True, "auto: 30.0 planned TFLOP pay back its compile"),
        ({"bf16": True}, 29.9, True, True, False, "auto: 29.9 planned TFLOP, under 30 in bf16"),
        ({}, 70, True, True, True, "auto: 70.0 planned TFLOP pay back its compile"),
        ({}, 69.9, True, True, False, "auto: 69.9 planned TFLOP, under 70 in fp32"),  # fp32 gains less
        ({}, None, True, True, False, "auto: a stream without --max_steps"),
        ({"bf16": True}, 100, True, True, True, "auto: 100.0 planned TFLOP"),
        ({"bf16": True}, 100, False, True, False, "auto: bf16 on a CPU without AMX"),
        ({}, 100, False, True, True, "auto: 100.0 planned TFLOP"),  # fp32 compiles on any x86 CPU
        ({}, 100, True, False, False, "auto: no C++ compiler"),
        ({"use_cpu": False}, 100, True, True, False, "auto: not measured on GPUs"),
        ({"world_size": 2}, 100, True, True, False, "auto: multi-process CPU runs"),
        ({"deepspeed": "ds.json"}, 100, True, True, False, "auto: multi-process CPU runs"),
        ({"activation_checkpointing": True}, 100, True, True, False, "auto: --activation_checkpointing"),
        ({"torch_compile_auto": False, "torch_compile": False}, 100, True, True, False, "as given"),
        ({"torch_compile_auto": False, "torch_compile": True}, 0.1, True, True, True, "as given"),
    ],
)
def test_auto_compile_rule(monkeypatch, overrides, tflop, amx, compiler, expected, reason):
    from lmkit import perf

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(perf, "have_cpp_compiler", lambda: compiler)
    args = _compile_args(**overrides)
    said = perf.resolve_torch_compile(args, None if tflop is None else tflop * 1e12)
    assert args.torch_compile is expected
    assert said.startswith(f"torch.compile {'on' if expected else 'off'} ({reason}")
    assert args.torch_compile_backend == ("inductor" if expected and args.torch_compile_auto else None)


def test_planned_training_flops_counts_what_the_trainer_will_run():
    from lmkit.perf import planned_training_flops, training_flops_per_token

    config = tiny_config()
    per_micro_batch = 4 * 16 * training_flops_per_token(config, 16)  # micro-batch 4, blocks of 16 tokens
    rows = Dataset.from_dict({"input_ids": [[1, 2]] * 10})

    def planned(dataset=rows, **overrides):
        return planned_training_flops(_compile_args(**overrides), dataset, config, 16) / per_micro_batch

    assert planned(max_steps=7, gradient_accumulation_steps=3) == 21
    assert planned(num_train_epochs=2.0) == 6  # ceil(10 / 4) x 2
    assert planned(num_train_epochs=0.5) == 2  # 1.5 rounds up, as the Trainer's max_steps does
    assert planned(rows.to_iterable_dataset(), max_steps=5) == 5
    assert planned_training_flops(_compile_args(), rows.to_iterable_dataset(), config, 16) is None


def test_compile_auto_is_decided_before_the_model_is_built(tmp_path, monkeypatch, dynamo_env):
    # The recipe's wiring, without paying for a compile: a run at the threshold is compiled, and the auto attention
    # follows the decision (eager math for compiled CPU runs of <= 256 tokens); one micro-batch fewer stays eager.
    from _recipes import load_recipe

    from lmkit import perf

    pretrain = load_recipe("pretrain")
    preset = LMConfig(  # recipes/configs/tiny.yaml, which the recipe runs by default
        vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )
    threshold = 40 * 16 * 128 * perf.training_flops_per_token(preset, 128)  # 40 micro-batches of 16 x 128 tokens
    monkeypatch.setattr(perf, "CPU_COMPILE_MIN_FLOPS", {"fp32": threshold})  # the run below is fp32
    seen = []

    def stop(model, args, *rest, **kwargs):
        seen.append((args.torch_compile, model.config._attn_implementation))
        raise KeyboardInterrupt  # nothing is trained

    monkeypatch.setattr(pretrain, "train_and_save", stop)
    for steps in (40, 39):
        out = tmp_path / f"run{steps}"
        argv = ["--max_steps", str(steps), "--output_dir", str(out), "--bf16", "false", "--report_to", "none"]
        with pytest.raises(KeyboardInterrupt):
            pretrain.main(argv)
    assert seen == [(True, "eager"), (False, "sdpa")]
