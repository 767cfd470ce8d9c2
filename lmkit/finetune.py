"""Starting points and adapters for fine-tuning: load a checkpoint and its tokenizer, add tokens, wire LoRA, merge.

Any causal-LM checkpoint works: an lmkit output dir or its ``checkpoint-N``, a local transformers model folder, or
a hub id. The tokenizer comes from the same folder (or ``--tokenizer PATH``); lmkit gives it a pad token distinct
from EOS when it has none, and adds the chat markers a template file needs. New tokens get embedding rows set to
the mean of the existing rows (deterministic, so a merge that re-creates them reproduces them exactly).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations import is_deepspeed_zero3_enabled

import lmkit  # noqa: F401  (registers the lmkit model with the Auto classes)
from lmkit.args import DataArguments, LMTrainingArguments, ModelArguments, explicit_fields
from lmkit.collator import CausalLMCollator
from lmkit.errors import LMKitError
from lmkit.finetune_args import FinetuneArguments
from lmkit.hub import MERGED_DIR, load_config, local_path, lora_adapter_problem
from lmkit.sft import TEXT, end_of_turn_token
from lmkit.tokenizer import PAD_TOKEN

logger = logging.getLogger(__name__)


def rows_of_one_length(fmt: str, packing: bool) -> bool:
    """Packed rows and text blocks all have the width ``--block_size`` gives them; unpacked SFT examples vary."""
    return packing or fmt == TEXT


def sft_collator(
    pad_token_id: int, data_args: DataArguments, ft_args: FinetuneArguments, fmt: str
) -> CausalLMCollator:
    """recipes/finetune.py's collator. Rows of one length are batched as they are (a ``--block_size`` that is no
    multiple of ``--pad_to_multiple_of`` must not grow every batch). Unpacked SFT examples vary: a stream pads every
    batch to ``--block_size`` (`CausalLMCollator.pad_to_length`), in-memory rows to a multiple of
    ``--pad_to_multiple_of``."""
    if rows_of_one_length(fmt, ft_args.packing):
        return CausalLMCollator(pad_token_id)
    if data_args.streaming:
        return CausalLMCollator(pad_token_id, pad_to_length=data_args.block_size)
    return CausalLMCollator(pad_token_id, pad_to_multiple_of=ft_args.pad_to_multiple_of)


def default_sft_sampling(args: LMTrainingArguments, data_args: DataArguments, fmt: str, packing: bool) -> None:
    """SFT's batching rule: unpacked in-memory examples are batched by length (``group_by_length``) unless the user
    chose ``--train_sampling_strategy``. Rows of one length padded together waste less compute: on the
    fine-tuning benchmark (benchmarks/README.md, bench_finetune.py) it ran 1.37x the random order's trained tokens/s
    at the same losses, and beat padding-free packing, which on a CPU pays attention over the whole flattened row.
    Packed rows and text blocks all have one length and a stream has no lengths to group: those keep their order.
    """
    if "train_sampling_strategy" in explicit_fields(args) or rows_of_one_length(fmt, packing) or data_args.streaming:
        return
    args.train_sampling_strategy = "group_by_length"
    logger.info("SFT batches are grouped by length (--train_sampling_strategy group_by_length; pass random to mix)")


# ---------------------------------------------------------------------------------------------------------------
# Starting point
# ---------------------------------------------------------------------------------------------------------------


def resolve_starting_point(spec: str | None) -> str:
    """Check ``--model_name_or_path``: a local folder must hold a model's config.json; anything else is a hub id."""
    if not spec:
        raise LMKitError("--model_name_or_path is required: the checkpoint folder or hub id to fine-tune")
    path = local_path(spec)
    if path is None:
        return spec
    if not path.exists():
        raise LMKitError(f"--model_name_or_path {spec}: no such directory (and not a hub id)")
    if not path.is_dir():
        raise LMKitError(f"--model_name_or_path {spec}: not a directory")
    if (path / "config.json").is_file():
        return str(path)
    if problem := lora_adapter_problem(path):
        raise LMKitError(f"--model_name_or_path {spec}: {problem}")
    checkpoints = sorted(p.name for p in path.glob("checkpoint-*") if (p / "config.json").is_file())
    hint = f" (it has {', '.join(checkpoints)}: pass one of those)" if checkpoints else ""
    raise LMKitError(f"--model_name_or_path {spec}: no config.json, so not a model checkpoint folder{hint}")


def load_starting_point(model_args: ModelArguments) -> tuple[str, PretrainedConfig]:
    """``--model_name_or_path`` checked (`resolve_starting_point`) and its config, read before any weights."""
    spec = resolve_starting_point(model_args.model_name_or_path)
    return spec, load_config(spec, model_args.trust_remote_code, "--model_name_or_path")


@dataclass
class LoadedModel:
    """What the start-up report shows of the model a run fine-tunes: the checkpoint and its config's shape.

    (`ModelArguments`' shape fields describe a model built from scratch; they do not apply to a loaded one.)
    """

    model_name_or_path: str
    model_type: str
    vocab_size: int | None
    hidden_size: int | None
    intermediate_size: int | None
    num_hidden_layers: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    max_position_embeddings: int | None
    attn_implementation: str
    trust_remote_code: bool

    @classmethod
    def describe(cls, model_args: ModelArguments, spec: str, config: PretrainedConfig) -> LoadedModel:
        given = {"model_name_or_path", "model_type", "attn_implementation", "trust_remote_code"}
        shape = {f.name: getattr(config, f.name, None) for f in fields(cls) if f.name not in given}
        return cls(
            model_name_or_path=spec,
            model_type=config.model_type,
            attn_implementation=model_args.attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
            **shape,
        )


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> tuple[PreTrainedTokenizerBase, int]:
    """(tokenizer, number of tokens it had as saved); a pad token distinct from EOS is added if missing."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise LMKitError(
            f"--model_name_or_path {spec}: could not load its tokenizer ({type(err).__name__}: {err}); "
            "pass --tokenizer PATH if it lives elsewhere"
        ) from err
    n_saved = len(tokenizer)
    if tokenizer.eos_token is None:
        raise LMKitError(f"tokenizer {spec}: has no EOS token, so answers could not end")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # The collator masks padding out of the loss: a pad equal to EOS would also mask every answer's end.
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        logger.info("tokenizer %s: added pad token %s (id %d)", spec, PAD_TOKEN, tokenizer.pad_token_id)
    return tokenizer, n_saved


def load_model(
    spec: str,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
) -> PreTrainedModel:
    """The causal LM at ``spec`` in fp32 (mixed precision comes from the Trainer), or 4-bit NF4 for QLoRA."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs.update(quantization_config=_qlora_config(), dtype=torch.bfloat16)
    try:
        return AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise LMKitError(
            f"--model_name_or_path {spec}: could not load a causal LM ({type(err).__name__}: {err})"
        ) from err


def _qlora_config() -> Any:
    if not torch.cuda.is_available():
        raise LMKitError(
            "--load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA device "
            "(use --use_lora without --load_in_4bit to train LoRA in full precision)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise LMKitError("--load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def check_vocab(model: PreTrainedModel, n_tokens: int, spec: str) -> None:
    """The tokenizer as saved must fit the model's embedding; more tokens than rows means another model's tokenizer."""
    rows = model.get_input_embeddings().num_embeddings
    if n_tokens > rows:
        raise LMKitError(
            f"--model_name_or_path {spec}: the tokenizer has {n_tokens} tokens but the model's embedding has only "
            f"{rows} rows: they do not belong together (pass the model's own tokenizer with --tokenizer)"
        )


def add_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_saved: int, new_special: list[str]
) -> list[int]:
    """Add ``new_special`` tokens, grow the embeddings if needed, and set every added token's rows to the mean row.

    ``n_saved`` is the tokenizer's size before lmkit touched it (tokens from there on are new, the pad included).
    Returns the new token ids. Under DeepSpeed ZeRO-3 the parameters are sharded: transformers' resize gathers
    them itself, and the mean rows are written inside ``GatheredParameters`` (rank 0 modifies, then re-partitions).
    """
    if new_special:
        tokenizer.add_special_tokens({"extra_special_tokens": new_special}, replace_extra_special_tokens=False)
        logger.info("added special tokens %s", new_special)
    new_ids = list(range(n_saved, len(tokenizer)))
    if not new_ids:
        return []
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        logger.info("resized the embeddings to %d rows", model.get_input_embeddings().num_embeddings)
    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    with _gathered(weights), torch.no_grad():
        for weight in weights:
            weight[new_ids] = weight[:n_saved].mean(dim=0).to(weight.dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return new_ids


def _gathered(params: list[nn.Parameter]) -> Any:
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def add_stop_token(model: PreTrainedModel, token_id: int | None) -> None:
    """Make ``generate`` also stop at ``token_id`` (a chat template's end-of-turn marker)."""
    config = getattr(model, "generation_config", None)
    if token_id is None or config is None:
        return
    eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    if token_id not in eos:
        config.eos_token_id = eos + [token_id]


def prepare_model(
    spec: str,
    tokenizer: PreTrainedTokenizerBase,
    n_saved: int,
    new_special: list[str],
    *,
    tokenizer_spec: str | None = None,
    chat: bool = False,
    lora: FinetuneArguments | None = None,
    activation_checkpointing: bool = False,
    **load_kwargs: Any,
) -> tuple[nn.Module, list[int]]:
    """The model a run starts from, and the ids of the tokens added to it.

    Loads ``spec`` (`load_model` with ``load_kwargs``), checks that the tokenizer as saved (``n_saved`` tokens, from
    ``tokenizer_spec``, default ``spec``) fits it, adds ``new_special`` with mean embedding rows (`add_tokens`),
    with ``chat`` makes generation stop at the chat template's end-of-turn marker too (looked up after the new
    tokens exist: it is often one of them), and with ``lora`` wraps the model in adapters (`apply_lora`).
    `merge_lora` rebuilds a run's base the same way, so the merged model has exactly the rows the run trained on.
    """
    model = load_model(spec, **load_kwargs)
    check_vocab(model, n_saved, tokenizer_spec or spec)
    new_ids = add_tokens(model, tokenizer, n_saved, new_special)
    if chat:
        add_stop_token(model, end_of_turn_token(tokenizer))
    if lora is not None:
        model = apply_lora(model, lora, new_token_ids=new_ids, activation_checkpointing=activation_checkpointing)
    return model, new_ids


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``--lora_target_modules`` can name)."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    return sorted(names)


# Mask resolution of `CPUDropout`: an element is dropped when a uniform 16-bit draw is below round(p * 2**16).
DROPOUT_LEVELS = 1 << 16


class CPUDropout(nn.Dropout):
    """`nn.Dropout` that draws its masks for CPU tensors with numpy's PCG64 instead of torch's generator.

    peft gives every adapted linear layer its own input dropout, and torch draws a CPU mask element by element from
    its Mersenne Twister: 5.3 ms for an 8 x 200 x 256 input on 2 cores, 28 masks a step for 4 layers, 30% of a LoRA
    step at that size (`torch.profiler`: ``aten::bernoulli_``). 16-bit draws from PCG64 give the same kind of mask
    3.2x faster, multiply included. The generator is seeded from torch's, so `set_seed` and a checkpoint's saved
    RNG state reproduce the masks. Kept elements scale by 2**16 / (2**16 - cutoff), so the expectation is exactly
    the input; p itself is rounded to a multiple of 2**-16 (0.05 drops 0.0500031 of the elements). In eval mode, on
    other devices, in place and under torch.compile (whose generated kernels draw their own masks, and which numpy
    would split into graph breaks), this is `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.is_cpu and self.p > 0) or self.inplace or torch.compiler.is_compiling():
            return super().forward(x)
        cutoff = round(self.p * DROPOUT_LEVELS)
        seed = int(torch.randint(2**62, ()))
        draws = np.random.Generator(np.random.PCG64(seed)).integers(DROPOUT_LEVELS, size=x.numel(), dtype=np.uint16)
        keep = torch.from_numpy(draws >= cutoff).view(x.shape)
        # Autograd keeps only the boolean mask (as nn.Dropout does); the scale is applied in place.
        return (x * keep).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - cutoff))


def apply_lora(
    model: PreTrainedModel,
    ft_args: FinetuneArguments,
    *,
    new_token_ids: list[int] | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters; only they (and the rows of ``new_token_ids``) train.

    With activation checkpointing the frozen embedding's output must require grad, or a reentrant checkpoint
    would see no input needing grad and the adapters inside would get none: `enable_input_require_grads` fixes it.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets: str | list[str] = ft_args.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    else:
        existing = linear_module_names(model)
        missing = [t for t in targets if t not in existing]
        if missing:
            raise LMKitError(
                f"--lora_target_modules {' '.join(missing)}: no such module in the model; its linear layers are "
                f"{', '.join(existing)} (or use all-linear)"
            )
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)
    config = LoraConfig(
        r=ft_args.lora_r,
        lora_alpha=ft_args.lora_alpha,
        lora_dropout=ft_args.lora_dropout,
        target_modules=targets,
        trainable_token_indices=new_token_ids or None,  # new chat markers must learn their embeddings
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for module in model.modules():  # peft's per-layer input dropouts: the CPU-fast mask (`CPUDropout`)
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, layer in dropouts.items():
                if type(layer) is nn.Dropout:
                    dropouts[name] = CPUDropout(layer.p)
    if activation_checkpointing:
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %s of %s parameters train (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def merge_lora(
    base_spec: str, adapter_dir: str, out_dir: str | None = None, *, trust_remote_code: bool = False
) -> str:
    """Build the base model again as the run did (`prepare_model`), apply the saved adapter, merge, save.

    Reloading (rather than merging the model in memory) gives a full-precision base even after QLoRA, and a
    consolidated model after ZeRO-3 / FSDP. Returns the folder the merged model and tokenizer were written to.
    """
    from peft import PeftModel

    out_dir = out_dir or str(Path(adapter_dir) / MERGED_DIR)
    base_tokenizer, n_saved = load_tokenizer(base_spec, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the run's tokenizer: pad, markers and template
    if len(tokenizer) < len(base_tokenizer):
        raise LMKitError(f"--merge_lora: the tokenizer in {adapter_dir} does not extend the base model's tokenizer")
    new_special = tokenizer.convert_ids_to_tokens(list(range(len(base_tokenizer), len(tokenizer))))
    base, _ = prepare_model(base_spec, base_tokenizer, n_saved, new_special, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.generation_config = _generation_config(adapter_dir, model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("merged model written to %s", out_dir)
    return out_dir


def _generation_config(adapter_dir: str, model: PreTrainedModel) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(adapter_dir)
    except OSError:
        return model.generation_config
