"""The training data each recipe builds, one call per recipe, without a model's weights or an output dir.

``recipes/inspect_data.py`` calls these to show rows exactly as ``recipes/pretrain.py``, ``finetune.py`` and
``dpo.py`` feed them to the Trainer: the same argument checks, tokenizer, chat template and added special tokens,
datasets and collator, all from the lmkit functions those recipes call. What needs the model (special tokens that
grow the embedding) runs on a weightless copy on the meta device. Reference log-probs (DPO) are not computed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from lmkit.args import (
    DataArguments,
    LMTrainingArguments,
    ModelArguments,
    check_block_size,
    explicit_fields,
    load_yaml_config,
)
from lmkit.collator import CausalLMCollator
from lmkit.data import build_mixture, load_sources, load_tokenized_dataset, source_texts, use_tokenized_dataset
from lmkit.dpo import (
    PreferenceCollator,
    build_preference_sources,
    cache_root,
    is_conversational,
    load_preference_sources,
    mix_preference_sources,
)
from lmkit.dpo_args import PreferenceArguments, fit_preference_args
from lmkit.errors import LMKitError
from lmkit.finetune import add_tokens, check_vocab, load_starting_point, load_tokenizer, sft_collator
from lmkit.finetune_args import FinetuneArguments
from lmkit.preprocess import load_tokenized_finetune, sft_rows_format
from lmkit.sft import CHAT, TEXT, build_finetune_datasets, resolve_chat_template, sft_format
from lmkit.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

GROUPS = {  # each recipe's argument groups (lmkit.inspect.RECIPES names them)
    "pretrain": (ModelArguments, DataArguments, LMTrainingArguments),
    "finetune": (ModelArguments, DataArguments, FinetuneArguments, LMTrainingArguments),
    "dpo": (ModelArguments, DataArguments, FinetuneArguments, PreferenceArguments, LMTrainingArguments),
}


def which_recipe(argv: list[str]) -> str:
    """``--recipe`` if given; else dpo when a preference field is set (flags or --config), finetune when a
    fine-tuning field or --model_name_or_path is, else pretrain."""
    given = {}  # flag -> value, as argparse reads "--flag value" and "--flag=value"
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            given[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    config = load_yaml_config(given["config"]) if given.get("config") else {}  # parse_args reads "--config FILE"
    if given.get("recipe") or config.get("recipe"):
        return given.get("recipe") or config["recipe"]
    keys = set(given) | set(config)
    if keys & {f.name for f in fields(PreferenceArguments)}:
        return "dpo"
    if keys & ({f.name for f in fields(FinetuneArguments)} | {"model_name_or_path"}):
        return "finetune"
    return "pretrain"


@dataclass
class RecipeData:
    """What a recipe hands the Trainer: ``datasets`` {"train", "validation"} (a split may be None), the
    ``collator`` that batches them, the ``tokenizer`` that made them, whether rows are preference pairs, and
    whether rows are documents joined by EOS (packed text blocks) rather than one example each (SFT)."""

    tokenizer: PreTrainedTokenizerBase
    datasets: dict[str, Any]
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    preference: bool = False
    eos_separates: bool = True
    chat: bool = False  # rows rendered with the chat template


def pretrain_data(
    model_args: ModelArguments, data_args: DataArguments, args: LMTrainingArguments, tokenizer_docs: int
) -> RecipeData:
    """recipes/pretrain.py's data: its sources (``--datasets`` or one), tokenizer (trained on the first
    ``tokenizer_docs`` documents of a stream), packed blocks mixed by weight, `CausalLMCollator`. Validation is
    ``{source name: blocks}`` when there are several sources. ``--tokenized_dataset``: its blocks and tokenizer."""
    use_tokenized_dataset(data_args, explicit_fields(data_args))
    check_block_size(data_args, args, model_args.max_position_embeddings, "the model's --max_position_embeddings")
    if data_args.tokenized_dataset is not None:
        datasets, tokenizer = load_tokenized_dataset(data_args)
        return RecipeData(tokenizer, datasets, CausalLMCollator(pad_token_id=tokenizer.pad_token_id))
    raws = load_sources(data_args, seed=args.seed)
    texts = source_texts(raws)
    if data_args.streaming:
        texts = islice(texts, tokenizer_docs)
    tokenizer = build_tokenizer(data_args.tokenizer, texts, model_args.vocab_size)
    datasets = build_mixture(raws, tokenizer, data_args, args.seed, main_process_first=args.main_process_first)
    return RecipeData(tokenizer, datasets, CausalLMCollator(pad_token_id=tokenizer.pad_token_id))


def _starting_tokenizer(model_args: ModelArguments, data_args: DataArguments) -> tuple[str, Any, Any, str, int]:
    spec, model_config = load_starting_point(model_args)
    tokenizer_spec = spec if data_args.tokenizer in ("train", "char") else data_args.tokenizer
    tokenizer, n_saved = load_tokenizer(tokenizer_spec, model_args.trust_remote_code)
    return spec, model_config, tokenizer, tokenizer_spec, n_saved


def _add_special_tokens(
    model_config: Any, tokenizer: PreTrainedTokenizerBase, n_saved: int, new_special: list[str], spec: str, trust: bool
) -> None:
    """What `lmkit.finetune.prepare_model` does to the tokenizer (check it fits the model, add the chat markers),
    on a model built on the meta device: no weights are read or allocated."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust)
    check_vocab(model, n_saved, spec)
    add_tokens(model, tokenizer, n_saved, new_special)


def finetune_data(
    model_args: ModelArguments, data_args: DataArguments, ft_args: FinetuneArguments, args: LMTrainingArguments
) -> RecipeData:
    """recipes/finetune.py's data: raw text as packed blocks, or prompt/completion and chat rows with their loss
    masks (packed with ``--packing``), and the collator (padding streamed unpacked rows to ``--block_size``).
    ``--tokenized_dataset``: its blocks or SFT rows, which must come from the model's tokenizer."""
    tokenized = use_tokenized_dataset(data_args, explicit_fields(data_args))
    spec, model_config, tokenizer, tokenizer_spec, n_saved = _starting_tokenizer(model_args, data_args)
    max_positions = getattr(model_config, "max_position_embeddings", None)
    check_block_size(data_args, args, max_positions, "the model's max_position_embeddings")
    fmt = sft_rows_format(tokenized, sft_format(data_args))
    new_special: list[str] = []
    if fmt == CHAT:
        tokenizer.chat_template, new_special = resolve_chat_template(ft_args.chat_template, tokenizer)
    _add_special_tokens(model_config, tokenizer, n_saved, new_special, tokenizer_spec, model_args.trust_remote_code)
    if tokenized is not None:
        datasets = load_tokenized_finetune(data_args, tokenizer, tokenized, fmt, ft_args)
        collator = sft_collator(tokenizer.pad_token_id, data_args, ft_args, fmt)  # (no --streaming here)
        return RecipeData(tokenizer, datasets, collator, eos_separates=fmt == TEXT, chat=fmt == CHAT)
    datasets = build_finetune_datasets(
        data_args, tokenizer, fmt, train_on_prompt=ft_args.train_on_prompt, packing=ft_args.packing, seed=args.seed,
        main_process_first=args.main_process_first,
    )  # fmt: skip
    collator = sft_collator(tokenizer.pad_token_id, data_args, ft_args, fmt)
    return RecipeData(tokenizer, datasets, collator, eos_separates=fmt == TEXT, chat=fmt == CHAT)


def dpo_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    ft_args: FinetuneArguments,
    pref_args: PreferenceArguments,
    args: LMTrainingArguments,
) -> RecipeData:
    """recipes/dpo.py's data: preference pairs tokenized and cut to ``--max_length`` (each ``--datasets`` source on
    its own, then mixed by weight), and `PreferenceCollator`."""
    if ft_args.train_on_prompt:
        raise LMKitError("--train_on_prompt does not apply to preference tuning: only answers are scored")
    spec, model_config, tokenizer, tokenizer_spec, n_saved = _starting_tokenizer(model_args, data_args)
    fit_preference_args(pref_args, getattr(model_config, "max_position_embeddings", None),
                        "the model's max_position_embeddings")  # fmt: skip
    rows = load_preference_sources(data_args, seed=args.seed)
    new_special: list[str] = []
    chat = any(is_conversational(splits["train"]) for splits in rows.values())
    if chat:
        tokenizer.chat_template, new_special = resolve_chat_template(ft_args.chat_template, tokenizer)
    _add_special_tokens(model_config, tokenizer, n_saved, new_special, tokenizer_spec, model_args.trust_remote_code)
    settings = {"cache_dir": cache_root(data_args), "num_proc": data_args.preprocessing_num_workers}
    datasets = build_preference_sources(rows, tokenizer, pref_args.max_length, **settings)
    datasets = mix_preference_sources(datasets, data_args, args.seed)
    collator = PreferenceCollator.from_args(tokenizer.pad_token_id, ft_args)
    return RecipeData(tokenizer, datasets, collator, preference=True, chat=chat)
