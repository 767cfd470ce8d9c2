"""Speed accounting: training FLOPs per token, the device's matmul peak, MFU, and time spent waiting on data.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / the device's peak matmul FLOP/s for the
training dtype. "Model FLOPs" are the FLOPs the math needs, not what the implementation executes: recomputation
(activation checkpointing, the chunked loss re-running the LM head) is not counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) tensor-core peaks per device, FLOP/s, from the vendors' data sheets. Matched by
# substring of `torch.cuda.get_device_name()`, first match wins, so specific names come before general ones.
# "fp32" is the TF32 tensor-core rate where the card has one (what torch uses with allow_tf32 / "high" matmul
# precision) and the plain FP32 rate otherwise.
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250e12, "fp32": 1100e12},
    "H200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp32": 378.0e12},
    "H100 NVL": {"bf16": 835.0e12, "fp32": 417.5e12},
    "H100": {"bf16": 989.4e12, "fp32": 494.7e12},  # SXM
    "GH200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "A100": {"bf16": 312.0e12, "fp32": 156.0e12},
    "L40S": {"bf16": 362.1e12, "fp32": 183.0e12},
    "L4": {"bf16": 121.0e12, "fp32": 60.0e12},
    "A10G": {"bf16": 70.0e12, "fp32": 35.0e12},
    "A10": {"bf16": 125.0e12, "fp32": 62.5e12},
    "RTX 4090": {"bf16": 165.2e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71.0e12, "fp32": 35.6e12},
    "V100": {"bf16": 125.0e12, "fp32": 15.7e12},  # no bf16: the fp16 tensor-core rate
    "MI300X": {"bf16": 1307.4e12, "fp32": 653.7e12},
}


# Under torch.compile on a CPU, the plain attention math (`eager`) is faster than SDPA's CPU flash kernel for short
# sequences: inductor fuses the mask, softmax and casts around two batched matmuls, while the flash backward stays
# one opaque kernel. Measured on a 4 x 256 model, bf16, 2 threads, 2,048 tokens per step: seq 256 112 vs 126
# ms/step (eager 11% faster); seq 512 155 vs 150 ms/step (no gain, eager +12% peak RSS); seq 1024 the same time,
# eager +28% peak RSS from its (T x T) scores.
CPU_COMPILED_EAGER_ATTENTION_MAX_SEQ = 256


def resolve_attn_implementation(requested: str, args: Any, seq_len: int) -> str:
    """``--attn_implementation auto``: `eager` for compiled CPU runs up to `CPU_COMPILED_EAGER_ATTENTION_MAX_SEQ`
    tokens, else `sdpa` (flash / memory-efficient kernels on GPUs). Any other value is returned as given."""
    if requested != "auto":
        return requested
    if args.torch_compile and args.use_cpu and seq_len <= CPU_COMPILED_EAGER_ATTENTION_MAX_SEQ:
        return "eager"
    return "sdpa"


# `--torch_compile auto`: compile a CPU run when its planned model FLOPs (a proxy for its eager time that holds
# across model shapes: step time grows with them, the compile cost barely does) are enough to pay back a compile
# from an empty inductor cache, for the run's matmul dtype. Measured break-even at the tiny preset (14.5 GFLOP a
# step; benchmarks/README.md, "Compile break-even" and "Compile in fp32"):
# - bf16: 581 steps = 8.4 TFLOP on a 2-core AMX Xeon (cold compile 83 s, then 2.17x eager); 648-1,085 steps =
#   9.4-15.7 TFLOP on a 2-core Xeon without AMX at one thread (1.29x);
# - fp32: 1,640 and 2,359 steps = 23.8 and 34.2 TFLOP on the AMX Xeon (1.23x and 1.12x: fp32 steps are bound by
#   the GEMMs, which compile does not speed up; at 4 x 256 it gains 0.96-1.05x).
# Each threshold is about twice the slowest break-even of its dtype, for compiles slowed by a loaded machine (157 s
# seen) and CPUs where compile gains less.
CPU_COMPILE_MIN_FLOPS = {"bf16": 30e12, "fp32": 70e12}


def have_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (g++, clang++ or $CXX)."""
    from torch._inductor.cpp_builder import get_cpp_compiler  # what inductor itself will look for

    try:
        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or a failing compiler probe
        return False
    return True


def planned_training_flops(args: Any, train_dataset: Any, config: Any, seq_len: int) -> float | None:
    """Model FLOPs one process plans to train (`training_flops_per_token`, full blocks of ``seq_len``) over
    ``--max_steps`` x accumulation micro-batches, else the epochs over a map-style dataset (rounded up, as the
    Trainer rounds its max_steps). None when unknown: a stream without --max_steps."""
    if args.max_steps > 0:
        micro_batches = args.max_steps * args.gradient_accumulation_steps
    elif hasattr(train_dataset, "__len__"):
        per_epoch = -(-len(train_dataset) // (args.per_device_train_batch_size * args.world_size))
        micro_batches = math.ceil(per_epoch * args.num_train_epochs)
    else:
        return None
    return micro_batches * args.per_device_train_batch_size * seq_len * training_flops_per_token(config, seq_len)


def _auto_compile_blocker(args: Any, planned_flops: float | None) -> str | None:
    if not args.use_cpu:
        return "not measured on GPUs yet (benchmarks/gpu_check.sh); pass --torch_compile true"
    if args.world_size > 1 or args.deepspeed:
        return "multi-process CPU runs are not measured with compile; pass --torch_compile true"
    if args.activation_checkpointing:  # transformers 5's name; --gradient_checkpointing is its deprecated alias
        return "--activation_checkpointing"
    if args.bf16 and not torch.cpu._is_amx_tile_supported():
        # Compiled bf16 on an AVX512-BF16 CPU without AMX gave NaN gradients where eager's were finite.
        return "bf16 on a CPU without AMX"
    if planned_flops is None:
        return "a stream without --max_steps: the run's length is unknown"
    dtype = "bf16" if args.bf16 else "fp32"
    if planned_flops < CPU_COMPILE_MIN_FLOPS[dtype]:
        return (
            f"{planned_flops / 1e12:,.1f} planned TFLOP, under {CPU_COMPILE_MIN_FLOPS[dtype] / 1e12:,.0f} in {dtype}"
        )
    if not have_cpp_compiler():
        return "no C++ compiler for inductor's kernels"
    return None


def resolve_torch_compile(args: Any, planned_flops: float | None) -> str:
    """Decide ``--torch_compile auto`` for a run of ``planned_flops`` (`planned_training_flops`; see
    `CPU_COMPILE_MIN_FLOPS`), setting ``args.torch_compile`` (and inductor as the backend, as TrainingArguments does
    for an explicit flag). Call it before the model is built: ``--attn_implementation auto`` follows it. Returns the
    decision and its reason, for the log. The threshold assumes an empty compile cache; inductor's on-disk FX-graph
    and AOTAutograd caches (on by default, in $TORCHINDUCTOR_CACHE_DIR, else /tmp/torchinductor_$USER) make a later
    run of the same shapes compile in 8-17 s instead."""
    if getattr(args, "torch_compile_auto", False):
        blocker = _auto_compile_blocker(args, planned_flops)
        args.torch_compile = blocker is None
        if args.torch_compile and args.torch_compile_backend is None:
            args.torch_compile_backend = "inductor"
        reason = f"auto: {blocker or f'{planned_flops / 1e12:,.1f} planned TFLOP pay back its compile'}"
    else:
        reason = "as given"
    return f"torch.compile {'on' if args.torch_compile else 'off'} ({reason})"


def dtype_key(dtype: torch.dtype) -> str:
    """ "bf16" for the 16-bit float types (fp16 has the same tensor-core rate), else "fp32"."""
    return "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------


def transformer_training_flops_per_token(
    *,
    num_layers: int,
    hidden_size: int,
    q_dim: int,
    kv_dim: int,
    intermediate_size: int,
    mlp_matrices: int,
    vocab_size: int,
    seq_len: int,
) -> int:
    """Forward + backward FLOPs per token of a decoder-only transformer: 6 N + 12 L q_dim T (PaLM, appendix B).

    N counts the weights of every matmul a token goes through: per layer Q, K, V, O projections (h x q_dim,
    2 h x kv_dim, q_dim x h) and ``mlp_matrices`` MLP matrices of h x intermediate (3 for SwiGLU, 2 for GELU), plus
    the LM head (h x vocab). The input embedding is a lookup (no FLOPs); norms, biases and activations are
    negligible and left out. The attention term counts scores and the weighted sum over all T positions, as
    PaLM does (no discount for the causal mask).
    """
    per_layer = (
        hidden_size * (q_dim + 2 * kv_dim) + q_dim * hidden_size + mlp_matrices * hidden_size * intermediate_size
    )
    n_matmul = num_layers * per_layer + hidden_size * vocab_size
    return 6 * n_matmul + 12 * num_layers * q_dim * seq_len


def training_flops_per_token(config: Any, seq_len: int) -> int:
    """`transformer_training_flops_per_token` for an lmkit `LMConfig`, a transformers `LlamaConfig` or `GPT2Config`."""
    if getattr(config, "model_type", None) == "gpt2":
        return transformer_training_flops_per_token(
            num_layers=config.n_layer,
            hidden_size=config.n_embd,
            q_dim=config.n_embd,
            kv_dim=config.n_embd,
            intermediate_size=config.n_inner or 4 * config.n_embd,
            mlp_matrices=2,
            vocab_size=config.vocab_size,
            seq_len=seq_len,
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return transformer_training_flops_per_token(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        q_dim=config.num_attention_heads * head_dim,
        kv_dim=kv_heads * head_dim,
        intermediate_size=config.intermediate_size,
        mlp_matrices=3,
        vocab_size=config.vocab_size,
        seq_len=seq_len,
    )


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs/token over the peak FLOP/s (a fraction, not a percentage)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_second * flops_per_token / peak_flops


# ---------------------------------------------------------------------------------------------------------------
# Peak
# ---------------------------------------------------------------------------------------------------------------


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The data-sheet peak of a GPU named ``device_name`` for ``dtype``, or None when the table has no match."""
    for key, peaks in GPU_PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return peaks[dtype_key(dtype)]
    return None


def best_seconds_per_call(
    fn: Callable[[], Any], min_seconds: float = 0.3, repeats: int = 3, sync: Callable[[], None] = lambda: None
) -> float:
    """Least seconds per call of ``fn`` over ``repeats`` timed rounds, after two warm-up calls (kernel selection,
    oneDNN primitive caches). Each round calls it for at least ``min_seconds`` (``sync`` waits for queued device
    work before each clock read); the best round is the least disturbed by other work on the machine."""
    for _ in range(2):
        fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if n % 4 == 0:
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
        best = min(best, elapsed / n)
    return best


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    size: int = 1024,
    min_seconds: float = 0.3,
    repeats: int = 3,
) -> float:
    """Best FLOP/s of square ``size`` x ``size`` matmuls in ``dtype`` on ``device`` (`best_seconds_per_call`).

    This is what the device achieves on a large, well-shaped matmul: the ceiling MFU is measured against, not a
    data-sheet figure.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return 2 * size**3 / best_seconds_per_call(lambda: torch.matmul(a, b), min_seconds, repeats, sync)


def resolve_peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float, str]:
    """The peak matmul FLOP/s MFU is measured against, and where it came from ("configured", the GPU, "measured").

    ``override`` wins; a CUDA device is looked up in `GPU_PEAK_FLOPS` (measured when it is not listed); anything
    else (a CPU) is measured with `measure_matmul_peak` once and then read from `cpu_peak_cache_file`.
    """
    if override:
        return float(override), "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is not None:
            return peak, f"{name} data sheet"
        return measure_matmul_peak(dtype, device, size=8192), f"{name} measured"
    return cached_cpu_peak(dtype)


def cpu_peak_cache_file() -> Path:
    """Where measured CPU peaks are kept: ``$XDG_CACHE_HOME/lmkit`` (default ``~/.cache/lmkit``)/cpu_peak_flops.json."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lmkit" / "cpu_peak_flops.json"


def _cpu_peak_key(dtype: torch.dtype) -> str:
    # What the measured number depends on: the CPU, the threads matmuls use, the dtype and torch's kernels.
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} | {torch.get_num_threads()} threads | {dtype} | torch {torch.__version__}"


def cached_cpu_peak(dtype: torch.dtype) -> tuple[float, str]:
    """The CPU's measured matmul peak for ``dtype``: measured (about a second) the first time for this CPU model,
    thread count, dtype and torch version, then read from `cpu_peak_cache_file` at no cost. An unreadable or
    unwritable cache only means measuring again."""
    file, key = cpu_peak_cache_file(), _cpu_peak_key(dtype)
    try:
        cache = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    peak = cache.get(key)
    if isinstance(peak, (int, float)) and peak > 0:
        return float(peak), f"cpu measured earlier, cached in {file}"
    peak = measure_matmul_peak(dtype, "cpu")
    cache[key] = peak
    try:  # write-then-rename: concurrent runs never read half a file
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".cpu_peak_flops.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, file)
    except OSError as err:
        logger.info("could not cache the measured CPU peak in %s (%s)", file, err)
    return peak, "cpu measured"


# ---------------------------------------------------------------------------------------------------------------
# CPU allocator
# ---------------------------------------------------------------------------------------------------------------


# glibc mallopt parameters (malloc.h) and the values lmkit sets; see `keep_freed_memory`.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees, so the next step reuses it (True if applied).

    By default glibc serves blocks of more than 128 KiB - 32 MiB (the threshold adapts) with fresh mmap()s and hands
    freed heap memory back to the OS past 128 KiB of slack, so every step's activations, gradients and logits land in
    new pages that the kernel must fault in and zero. CPU training pays for that on every step (measured: 2,000
    steps of shakespeare-char with torch.compile, 28.6k -> 38.4k tokens/s). Blocks up to 32 MiB now come from the
    heap and up to 1 GiB of free heap stays mapped; it is reused, not leaked. Only where the C library is glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError on musl and other C libraries)
    except (OSError, AttributeError):
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


# ---------------------------------------------------------------------------------------------------------------
# Data wait
# ---------------------------------------------------------------------------------------------------------------


class DataWaitTimer:
    """Accumulates the time spent fetching batches, to report it as a fraction of the wall time of an interval.

    ``with timer: batch = next(it)`` adds the block's duration; ``timer.fraction()`` returns the waiting time over
    the wall time since the last ``reset()`` (or creation) and ``reset()`` starts a new interval. ``clock`` is
    `time.perf_counter` except in tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.waited = 0.0
        self._interval_start = clock()
        self._entered = 0.0

    def __enter__(self) -> DataWaitTimer:
        self._entered = self._clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.waited += self._clock() - self._entered

    def fraction(self, now: float | None = None) -> float:
        elapsed = (self._clock() if now is None else now) - self._interval_start
        return self.waited / elapsed if elapsed > 0 else 0.0

    def reset(self, now: float | None = None) -> None:
        self.waited = 0.0
        self._interval_start = self._clock() if now is None else now


# ---------------------------------------------------------------------------------------------------------------
# Speed meter
# ---------------------------------------------------------------------------------------------------------------


class SpeedMeter:
    """Tokens/s, MFU and the data-wait fraction of each logging interval of a training run: the trainer's speed logs.

    ``start(tokens_seen)`` resolves the peak (`resolve_peak_flops`, once: a CPU measures for about a second) and
    then starts the first interval, before the first batch is fetched; ``with meter.waiting_for_data():`` wraps
    batch fetching; ``count(batch, config)`` adds the batch's training FLOPs; ``interval_logs(tokens_seen)`` returns
    the interval's numbers and starts the next interval. All three numbers share one interval, so MFU x peak /
    FLOPs-per-token gives the tokens/s back (when every rank counts the same tokens).

    Args:
        device: the device whose peak MFU is measured against (per device: FLOPs are counted on this rank).
        dtype: the training dtype (bf16/fp16 or fp32 tensor-core rate).
        peak_flops: a configured peak (``--peak_flops``); None looks it up or measures it.
        clock: `time.perf_counter` except in tests.
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        peak_flops: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.device, self.dtype, self._peak_override, self._clock = device, dtype, peak_flops, clock
        self.peak_flops: float | None = None
        self._data_wait = DataWaitTimer(clock)
        self._interval_start: float | None = None
        self._tokens_seen_at_start: int | None = None
        self._flops = 0.0
        self._flop_tokens = 0
        self._counts_flops = True

    @property
    def started(self) -> bool:
        return self._interval_start is not None

    def start(self, tokens_seen: int | None) -> None:
        """Resolve the peak (the first time) and start an interval; ``tokens_seen`` None: no tokens/s."""
        if self.peak_flops is None:
            self.peak_flops, source = resolve_peak_flops(self.device, self.dtype, self._peak_override)
            logger.info(
                "MFU is reported against a peak of %.2f TFLOP/s per device (%s, %s)",
                self.peak_flops / 1e12, source, self.dtype,
            )  # fmt: skip
        self._restart(self._clock(), tokens_seen)

    def waiting_for_data(self) -> DataWaitTimer:
        """A context manager: the time spent inside it counts as waiting for data."""
        return self._data_wait

    def count(self, batch: Any, config: Any) -> None:
        """Add the training FLOPs of a ``(B, T)`` ``input_ids`` batch for a model of ``config`` (any
        `training_flops_per_token` knows; other architectures, or batches without ``input_ids``, give no MFU)."""
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if not self._counts_flops or config is None or ids is None or ids.ndim != 2:
            return
        try:
            per_token = training_flops_per_token(config, ids.shape[1])
        except (AttributeError, TypeError):  # an architecture whose shape fields we do not know: no MFU
            self._counts_flops = False
            self._flops, self._flop_tokens = 0.0, 0
            return
        self._flops += ids.numel() * per_token
        self._flop_tokens += ids.numel()

    def interval_logs(self, tokens_seen: int | None, now: float | None = None) -> dict[str, float]:
        """``tokens_per_second`` (from ``tokens_seen``, all ranks), ``mfu`` and ``mfu_peak_tflops`` (when FLOPs were
        counted), ``data_wait_fraction`` over the interval since the last call (or `start`); then a new interval."""
        if self._interval_start is None:
            raise RuntimeError("SpeedMeter.interval_logs called before start()")
        now = self._clock() if now is None else now
        elapsed = now - self._interval_start
        logs: dict[str, float] = {}
        if elapsed > 0:
            if tokens_seen is not None and self._tokens_seen_at_start is not None:
                logs["tokens_per_second"] = round((tokens_seen - self._tokens_seen_at_start) / elapsed, 1)
            if self._flop_tokens and self.peak_flops:
                rate = self._flop_tokens / elapsed  # this rank's tokens/s
                logs["mfu"] = round(mfu(rate, self._flops / self._flop_tokens, self.peak_flops), 4)
                logs["mfu_peak_tflops"] = round(self.peak_flops / 1e12, 3)
            logs["data_wait_fraction"] = round(self._data_wait.fraction(now), 4)
        self._restart(now, tokens_seen)
        return logs

    def _restart(self, now: float, tokens_seen: int | None) -> None:
        self._interval_start, self._tokens_seen_at_start = now, tokens_seen
        self._data_wait.reset(now)
        self._flops, self._flop_tokens = 0.0, 0
