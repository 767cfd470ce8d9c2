"""Dataclass arguments for every recipe, and the one parser: ``--config FILE.yaml`` plus CLI overrides (CLI wins).

Every `transformers.TrainingArguments` flag works under its usual name; lmkit only changes a few defaults
and adds its own fields, grouped by concern below. YAML keys are exactly the dataclass field names.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.trainer_utils import IntervalStrategy

from lmkit.errors import LMKitError
from lmkit.mixture import parse_sources
from lmkit.perf import have_cpp_compiler

logger = logging.getLogger(__name__)

# Package data, found the same way in an editable and a regular install. The presets live beside the recipes.
BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus" / "tinyshakespeare.txt"


@dataclass
class ModelArguments:
    """What model to train: a checkpoint to start from, or the shape of a new one."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder or hub id to start from. None trains a new lmkit model from scratch."},
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of a new model, and the target size when training a tokenizer. "
            "None: the tokenizer's size rounded up to a multiple of 64."
        },
    )
    hidden_size: int = field(default=128, metadata={"help": "Width of the residual stream (alias: d_model)."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "SwiGLU hidden width (alias: d_ff). None: ~8/3 x hidden_size, multiple of 64."}
    )
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of decoder layers (alias: n_layers)."})
    num_attention_heads: int = field(default=4, metadata={"help": "Number of query heads (alias: n_heads)."})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Key/value heads for grouped-query attention. None: same as query heads."}
    )
    max_position_embeddings: int = field(default=256, metadata={"help": "Longest context the model supports."})
    rope_theta: float = field(default=10000.0, metadata={"help": "Rotary embedding base."})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share input embedding and LM head weights."})
    initializer_range: float = field(default=0.02, metadata={"help": "Std of the normal weight init."})
    attention_dropout: float = field(default=0.0, metadata={"help": "Dropout on attention probabilities."})
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention backend: sdpa, eager, flash_attention_2 (transformers' registry), or auto: eager for "
            "torch.compile'd CPU runs of up to 256 tokens, where inductor's fused math beats SDPA's CPU kernel; "
            "sdpa otherwise."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the fused LM-head + cross-entropy; 0 computes full logits; None sizes "
            "chunks to 2**25 logits (about 1,000 tokens at vocab 32k)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code shipped with a hub checkpoint to run. Off unless you pass it."}
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            problems.append(f"--vocab_size must be positive, got {self.vocab_size}")
        if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
            problems.append(
                f"--hidden_size {self.hidden_size} is not divisible by --num_attention_heads {self.num_attention_heads}"
            )
        kv = self.num_key_value_heads
        if kv is not None and (kv <= 0 or self.num_attention_heads % kv):
            problems.append(f"--num_key_value_heads {kv} must divide --num_attention_heads {self.num_attention_heads}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            problems.append(f"--loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        backends = ["auto", "eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if self.attn_implementation not in backends and "/" not in self.attn_implementation:  # "/": a hub kernel
            problems.append(
                f"--attn_implementation must be one of {', '.join(backends)}, got {self.attn_implementation!r}"
            )
        if problems:
            raise LMKitError("; ".join(problems))

    def config_kwargs(self) -> dict[str, Any]:
        """The fields that become `LMConfig` keyword arguments."""
        skip = {"model_name_or_path", "trust_remote_code", "attn_implementation", "vocab_size"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


@dataclass
class DataArguments:
    """Where the text comes from, how it is tokenized and cut into training blocks."""

    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training files, directories or globs (.txt, .jsonl/.json with a text field, .parquet). "
            "Default: the bundled Shakespeare corpus (when no --dataset_name)."
        },
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out files. None: split --validation_split off the training data."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset name, loaded with `datasets`."})
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "A weighted mixture of sources instead of --train_files / --dataset_name: in YAML a list of "
            "{name, weight, files | dataset_name, dataset_config_name, split, text_column, sample_by}; on the "
            "command line the same list as one JSON string (lmkit.mixture)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    text_column: str = field(default="text", metadata={"help": "Column (JSONL/parquet field) holding the text."})
    validation_split: float = field(
        default=0.05, metadata={"help": "Fraction held out for validation when no --validation_files are given."}
    )
    split_mode: str = field(
        default="random",
        metadata={"help": "How to hold out validation: 'random' documents, or the 'tail' of the corpus (nanoGPT)."},
    )
    sample_by: str = field(
        default="paragraph",
        metadata={
            "help": "How .txt files split into documents: 'line', 'paragraph' (blank-line separated) "
            "or 'document' (one per file). An EOS token separates documents."
        },
    )
    block_size: int = field(
        default=256, metadata={"help": "Tokens per training example (inputs; targets shift by 1)."}
    )
    max_eval_blocks: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N validation blocks. None: all of them (1024 with --streaming)."},
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the corpus instead of tokenizing it up front (needs --max_steps)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenized datasets are cached. None: datasets' default cache."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even when a cache exists."})
    tokenizer: str = field(
        default="train",
        metadata={
            "help": "'train' (byte-level BPE on the training files), 'char' (character level), "
            "or a path / hub id of an existing tokenizer."
        },
    )
    tokenized_dataset: str | None = field(
        default=None,
        metadata={
            "help": "A folder written by recipes/preprocess.py: train on its packed blocks and tokenizer, without "
            "reading raw text or tokenizing (instead of --train_files / --dataset_name)."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.block_size <= 0:
            problems.append(f"--block_size must be positive, got {self.block_size}")
        if not 0.0 <= self.validation_split < 1.0:
            problems.append(f"--validation_split must be in [0, 1), got {self.validation_split}")
        if self.split_mode not in ("random", "tail"):
            problems.append(f"--split_mode must be 'random' or 'tail', got {self.split_mode!r}")
        if self.sample_by not in ("line", "paragraph", "document"):
            problems.append(f"--sample_by must be 'line', 'paragraph' or 'document', got {self.sample_by!r}")
        if self.max_eval_blocks is not None and self.max_eval_blocks <= 0:
            problems.append(f"--max_eval_blocks must be positive, got {self.max_eval_blocks}")
        if self.train_files is not None and not self.train_files:
            problems.append("--train_files is empty")
        try:
            parse_sources(self)
        except LMKitError as err:
            problems.append(str(err))
        if self.tokenized_dataset is not None:
            sources = ("train_files", "dataset_name", "datasets")
            clash = [f"--{name}" for name in sources if getattr(self, name, None) is not None]
            if self.streaming:
                clash.append("--streaming")
            if clash:
                problems.append(f"--tokenized_dataset is already tokenized: drop {' and '.join(clash)}")
        if problems:
            raise LMKitError("; ".join(problems))


@dataclass
class LMTrainingArguments(TrainingArguments):
    """`TrainingArguments` with lmkit's defaults (AdamW, cosine, clip 1.0, TensorBoard) and a few lmkit fields."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Where checkpoints and the model go."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (weight matrices only)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction (<1) of all steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Loggers, or 'none'."})
    bf16: bool | str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast. Unset (auto): on where bf16 matmuls beat fp32 (a CUDA GPU with bf16, a CPU "
            "with AMX), off elsewhere (AVX512-BF16 alone runs bf16 matmuls slower than fp32)."
        },
    )
    torch_compile: bool | str = field(
        default="auto",
        metadata={
            "help": "torch.compile the model (inductor). Unset (auto): pretraining turns it on where its compile "
            "pays back, a single-process CPU run with a C++ compiler that plans at least "
            "lmkit.perf.CPU_COMPILE_MIN_FLOPS model FLOPs (30 TFLOP in bf16, about 2,100 steps of the tiny preset; "
            "70 TFLOP in fp32, where compile gains less); off elsewhere and in the other recipes."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: no, steps, epoch."})
    eval_steps: float | None = field(default=100, metadata={"help": "Evaluate every N optimizer steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluate the loss only (no logits)."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["shift_labels"], metadata={"help": "Batch keys holding the targets."}
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Track tokens seen: all, non_padding or no."}
    )
    # -- lmkit's own ------------------------------------------------------------------------------------------
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an output dir that already holds a finished model."}
    )
    sample_prompt: str | None = field(
        default="\n", metadata={"help": "Prompt for the short sample printed after training; None skips it."}
    )
    sample_max_new_tokens: int = field(default=200, metadata={"help": "Length of that sample in tokens."})
    peak_flops: float | None = field(
        default=None,
        metadata={
            "help": "Peak matmul FLOP/s of one device in the training dtype, the denominator of the logged MFU. "
            "None: the data-sheet figure for known GPUs (lmkit.perf.GPU_PEAK_FLOPS), else measured with a short "
            "matmul benchmark when training starts (CPUs)."
        },
    )
    cpu_allocator_reuse: bool = field(
        default=True,
        metadata={
            "help": "CPU runs: have glibc malloc keep and reuse the memory each step frees instead of returning it "
            "to the OS and faulting fresh pages in on the next step (lmkit.perf.keep_freed_memory)."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads per process (torch intra-op and OMP_NUM_THREADS). None: OMP_NUM_THREADS or accelerate's "
            "--num_cpu_threads_per_process when the user set them, else on CPU runs the usable cores divided among "
            "this machine's processes (accelerate launch's own default of 1 thread is not taken as a choice)."
        },
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata={
            "help": "Steps with a NaN/Inf loss or gradient are skipped; this many in a row stop the run "
            "(the last checkpoint stays as it was)."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.learning_rate <= 0:
            problems.append(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.gradient_accumulation_steps < 1:
            problems.append(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            problems.append(f"--max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            problems.append(f"--peak_flops must be positive, got {self.peak_flops}")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"--num_threads must be a positive integer, got {self.num_threads}")
        if self.max_nonfinite_steps < 1:
            problems.append(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.label_smoothing_factor:
            # The Trainer's label smoother takes `labels` and shifts them for the causal LMs it knows (Llama, ...):
            # lmkit's targets arrive already shifted (lmkit.collator), so they would be shifted twice.
            problems.append(
                f"--label_smoothing_factor {self.label_smoothing_factor} is not supported: lmkit's targets arrive "
                "already shifted, and the Trainer's label smoother would shift them again"
            )
        if problems:
            raise LMKitError("; ".join(problems))
        # The one hardware probe in lmkit's arguments (no process setting is changed; the start-up report logs the
        # outcome: device and bf16). It stays here rather than in the recipe set-up (prepare_run) because
        # TrainingArguments.__post_init__ (transformers 5) needs both settled before it runs: it rejects bf16
        # without use_cpu on a machine with no bf16 GPU (an unresolved "auto" is a truthy string there), derives
        # mixed_precision (and DeepSpeed's "auto" dtypes) from bf16, and resolves and caches `self.device`
        # (accelerate's PartialState(cpu=use_cpu)) and dataloader_pin_memory from use_cpu. Set afterwards, they
        # would disagree with what it already decided.
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True  # a laptop without an accelerator: bf16 autocast then runs on the CPU
        if self.bf16 == "auto":
            self.bf16 = not self.fp16 and native_bf16(cpu=self.use_cpu)
        # "auto" is decided by the recipe once it knows how long the run is (lmkit.perf.resolve_torch_compile);
        # until then it is off, which is also what every recipe that does not decide it keeps.
        self.torch_compile_auto = self.torch_compile == "auto"
        if self.torch_compile_auto:
            self.torch_compile = False
        # A toolchain check of an explicit --torch_compile, not a hardware default: fail before anything is built.
        if self.torch_compile and self.use_cpu and not have_cpp_compiler():
            raise LMKitError(
                "--torch_compile on a CPU needs a C++ compiler for its kernels (g++ or clang++, or set $CXX): install "
                "one or pass --torch_compile false"
            )
        try:
            super().__post_init__()
        except (ValueError, ImportError) as err:
            raise LMKitError(f"training arguments: {err}") from err


def _bool_or_auto(value: str) -> bool | str:
    return "auto" if value == "auto" else string_to_bool(value)


def native_bf16(cpu: bool) -> bool:
    """Whether bf16 autocast is the fast choice here: the device multiplies bf16 matrices in hardware.

    Probes the hardware; `LMTrainingArguments` calls it once, for ``--bf16 auto``."""
    if not cpu and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if cpu:
        # AMX only. AVX512-BF16 has bf16 dot-product instructions, but oneDNN's bf16 GEMM on them is slower than its
        # fp32 GEMM: 82 vs 121 GFLOP/s (1024^2, one thread) on a Xeon without AMX, where fine-tuning also ran 1.79x
        # faster in fp32 (benchmarks/README.md); 39 vs 65 GFLOP/s on an AMX Xeon with AMX masked off
        # (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), 282 GFLOP/s bf16 with it.
        return torch.cpu._is_amx_tile_supported()
    return False  # other accelerators (MPS, XPU, ...): leave it to an explicit --bf16


class _Parser(HfArgumentParser):
    """HfArgumentParser whose usage errors are one line that names the flag, and exit non-zero."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for action in self._actions:
            if action.dest in ("bf16", "torch_compile") and isinstance(action.default, str):
                # argparse runs string defaults through `type`, and HfArgumentParser's bool parser rejects "auto"
                action.type = _bool_or_auto

    def error(self, message: str) -> None:  # argparse's hook; never returns
        raise LMKitError(message)


def _yaml_to_argv(config: dict[str, Any], parser: _Parser, path: str | Path) -> list[str]:
    """The command-line flags of a YAML ``config`` (from ``path``), each value checked as its flag's parser checks
    it: a value of the wrong shape (a list for a single value) or type raises `LMKitError` naming the key and the
    file, where the command line would name neither (``block_size: [1, 2]`` reads as ``--block_size 1 2``)."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        action = parser._option_string_actions[f"--{key}"]
        many = action.nargs in ("+", "*")  # a list flag also takes one value
        values = value if isinstance(value, list) else [value]
        if (isinstance(value, list) and not many) or any(isinstance(v, list) for v in values):
            wanted = "a list of single values" if many else "a single value"
            raise LMKitError(f"--config {path}: {key} takes {wanted}, got {value!r}")
        if not values and action.nargs == "+":
            raise LMKitError(f"--config {path}: {key} takes at least one value, got []")
        # a mapping (a --datasets source, a JSON-valued flag) travels as one JSON string
        strings = [json.dumps(v) if isinstance(v, dict) else str(v) for v in values]
        try:
            parser._get_values(action, strings)  # argparse's own type and choices checks
        except argparse.ArgumentError as err:
            raise LMKitError(f"--config {path}: {key}: {err.message}") from err
        argv += [f"--{key}", *strings]
    return argv


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LMKitError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise LMKitError(f"--config {path}: not valid YAML ({type(err).__name__})") from err
    if not isinstance(config, dict):
        raise LMKitError(f"--config {path}: expected a mapping of field names to values")
    return config


def parse_args(
    dataclass_types: tuple[type, ...] = (ModelArguments, DataArguments, LMTrainingArguments),
    argv: list[str] | None = None,
    default_config: str | Path | None = None,
) -> tuple[Any, ...]:
    """Parse ``--config FILE.yaml`` (or ``default_config``) and CLI overrides into the dataclasses.

    Unknown keys and wrong value types raise `LMKitError` naming the key. Each returned group remembers which of
    its fields the user set (see `explicit_fields`): on the command line or in a ``--config`` file of their own.
    A preset shipped beside ``default_config`` (``recipes/configs/*.yaml``) sets defaults, not explicit values,
    whether it is the recipe's default or passed with ``--config``: its sizes may follow a smaller model.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, user_config = default_config, "--config" in argv
    if user_config:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise LMKitError("--config needs a YAML file path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    parser = _Parser(dataclass_types, allow_abbrev=False)
    known = {action.dest for action in parser._actions}
    yaml_argv: list[str] = []
    if config_path is not None:
        config = load_yaml_config(config_path)
        unknown = sorted(set(config) - known)
        if unknown:
            raise LMKitError(f"--config {config_path}: unknown config key(s): {', '.join(unknown)}")
        yaml_argv = _yaml_to_argv(config, parser, config_path)
    try:
        *groups, rest = parser.parse_args_into_dataclasses(
            args=yaml_argv + argv, look_for_args_file=False, return_remaining_strings=True
        )
    except ValueError as err:  # a dataclass __post_init__ outside lmkit's control
        raise LMKitError(str(err)) from err
    if rest:
        flags = [a for a in rest if a.startswith("--")] or rest
        hint = difflib.get_close_matches(flags[0], [f"--{k}" for k in known], n=1)
        raise LMKitError(f"unknown flag {flags[0]}" + (f" (did you mean {hint[0]}?)" if hint else ""))
    options = parser._option_string_actions  # every spelling: --a_b, --a-b, --no_a
    explicit = {options[flag].dest for flag in (a.split("=", 1)[0] for a in argv) if flag in options}
    if user_config and not _is_preset(config_path, default_config):
        explicit |= set(config)
    for group in groups:
        names = {f.name for f in fields(group)}
        object.__setattr__(group, _EXPLICIT, frozenset(explicit & names))
    return tuple(groups)


# ---------------------------------------------------------------------------------------------------------------
# Defaults that follow the model and the data
# ---------------------------------------------------------------------------------------------------------------

_EXPLICIT = "_lmkit_explicit_fields"


def _is_preset(config_path: str | Path, default_config: str | Path | None) -> bool:
    if default_config is None:
        return False
    return Path(config_path).resolve().parent == Path(default_config).resolve().parent


def explicit_fields(group: Any) -> frozenset[str]:
    """The fields of a group from `parse_args` that the user set: on the command line or in their ``--config``.

    A value from the recipe's default preset or a dataclass default is not explicit, so it may follow the model
    or the data when it does not fit them; an explicit value that does not fit is an error. A group built
    directly (not by `parse_args`) counts every field as explicit.
    """
    return getattr(group, _EXPLICIT, frozenset(f.name for f in fields(group)))


def fit_length(group: Any, field: str, max_positions: int | None, limit: str) -> None:
    """Make the length ``group.<field>`` fit a model of ``max_positions`` positions (``limit`` names that number).

    A default that is too long becomes ``max_positions``, with one log line; an explicit one raises `LMKitError`
    naming the flag. The rule for every length a model bounds: ``--block_size``, DPO's ``--max_length``.
    """
    value = getattr(group, field)
    if max_positions is None or value <= max_positions:
        return
    if field in explicit_fields(group):
        raise LMKitError(f"--{field} {value} exceeds {limit} {max_positions}")
    logger.info(
        "--%s %d (a default) exceeds %s %d: using --%s %d", field, value, limit, max_positions, field, max_positions
    )
    setattr(group, field, max_positions)


def fit_block_size(data_args: DataArguments, max_positions: int | None, limit: str) -> None:
    """`fit_length` for ``--block_size``."""
    fit_length(data_args, "block_size", max_positions, limit)


def check_streaming(data_args: DataArguments, args: LMTrainingArguments) -> None:
    """A stream has no length to count epochs by: ``--streaming`` needs ``--max_steps``."""
    if data_args.streaming and args.max_steps <= 0:
        raise LMKitError("--streaming needs --max_steps: a stream has no length to count epochs by")


def check_block_size(
    data_args: DataArguments, args: LMTrainingArguments, max_positions: int | None, limit: str
) -> None:
    """The data checks a training recipe runs before its start-up report (which then shows the fitted values):
    ``--streaming`` needs ``--max_steps``, ``--block_size`` fits the model (see `fit_block_size`), and evaluation
    has validation data (see `check_validation`)."""
    check_streaming(data_args, args)
    fit_block_size(data_args, max_positions, limit)
    check_validation(data_args, args)


def check_validation(data_args: DataArguments, args: LMTrainingArguments) -> None:
    """`fit_evaluation` when the flags alone say there is no validation data: ``--validation_split 0`` and only
    files (no ``--validation_files``, no hub dataset, which may bring a "validation" split, no
    ``--tokenized_dataset``, whose manifest says). Evaluation asked for then raises `LMKitError` before any data is
    read; a preset's is turned off."""
    if data_args.validation_split > 0 or data_args.validation_files or data_args.tokenized_dataset is not None:
        return
    if all(source.dataset_name is None for source in parse_sources(data_args)):
        fit_evaluation(args, nothing_held_out(data_args))


def nothing_held_out(data_args: DataArguments) -> str:
    """Why there is no validation data when ``--validation_split`` held none out (for `fit_evaluation`)."""
    return f"--validation_split {data_args.validation_split} holds out no validation data"


_EVAL_FLAGS = ("eval_strategy", "eval_on_start", "load_best_model_at_end")


def fit_evaluation(args: LMTrainingArguments, why_no_data: str) -> None:
    """There is no validation data (``why_no_data`` says why, naming the flag): evaluate nothing.

    Evaluation the user asked for (``--eval_strategy``, ``--eval_on_start``, ``--load_best_model_at_end``) raises
    `LMKitError`; evaluation that only a preset or a default turned on is turned off, with one log line.
    """
    asked = [
        name
        for name in _EVAL_FLAGS
        if name in explicit_fields(args) and getattr(args, name) not in (False, "no", IntervalStrategy.NO)
    ]
    if asked:
        value = getattr(args, asked[0])
        value = getattr(value, "value", value)
        raise LMKitError(f"--{asked[0]} {value}: {why_no_data}, so there is nothing to evaluate")
    if args.eval_strategy != "no" or args.eval_on_start or args.load_best_model_at_end:
        logger.info("%s: no evaluation (--eval_strategy no)", why_no_data)
    args.eval_strategy = IntervalStrategy.NO
    args.do_eval = args.eval_on_start = args.load_best_model_at_end = False
