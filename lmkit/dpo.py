"""Preference tuning: (prompt, chosen, rejected) pairs -> token ids -> per-sequence log-probs -> DPO / IPO / SimPO / ORPO.

Data (TRL's preference formats, JSONL / JSON / parquet files or a hub dataset):

- explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``;
- conversational: the same keys holding message lists (``prompt`` the conversation so far, ``chosen`` /
  ``rejected`` the assistant's answer turns), rendered with the chat template as `lmkit.sft` renders SFT chats;
- implicit prompt: ``{"chosen", "rejected"}`` only, two whole conversations (or strings) sharing a prefix: the
  longest common prefix is the prompt (TRL's ``extract_prompt``).

Each side is tokenized exactly as `lmkit.sft.tokenize_example` tokenizes an SFT example (the prompt with the
tokenizer's usual leading specials, the answer, then EOS, which is scored), so a model fine-tuned with
``recipes/finetune.py`` sees the same token layout. Only answer tokens are scored.

Log-probs: the model's backbone gives hidden states; the LM head and log-softmax run only on answer positions,
a chunk of tokens at a time under activation checkpointing (`token_logps`), so the ``(tokens, vocab)`` logits of a
batch never exist at once. `enable_token_logps` adds this as a mode of the model's own ``forward`` (TRL's
``add_fused_lm_head`` does the same), so DDP / DeepSpeed / FSDP / peft wrappers see an ordinary forward call.

The reference model is never held in memory while training: its log-probs are computed in one pass before
training (`add_reference_logps`) and cached on disk, keyed by the reference weights and the tokenized data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmkit.args import DataArguments
from lmkit.collator import IGNORE_INDEX, padded_width
from lmkit.data import FORMATS, _fingerprint, _tokenizer_hash, resolve_data_files
from lmkit.dpo_args import PreferenceArguments
from lmkit.errors import LMKitError
from lmkit.mixture import Source, log_mix, mix_blocks, parse_sources
from lmkit.rows import hold_out_indices, json_rows, messages_problem
from lmkit.sft import _more_examples, chat_segments, tokenize_example
from lmkit.trainer import LMTrainer

logger = logging.getLogger(__name__)

_CACHE_VERSION = "lmkit-preference-1"  # bump when tokenization or the reference pass changes
_PAIR_BATCH = 1000  # pairs per tokenize batch
_CHUNK_LOGITS = 2**25  # logits per chunk of the LM head (as the model's own fused loss sizes them)


# ---------------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------------


def _messages_problem(value: Any, key: str) -> str | None:
    if not isinstance(value, list):
        return f"{key!r} must be a string or a list of {{'role', 'content'}} messages"
    problem = messages_problem(value)
    return f"{key!r} {problem}" if problem else None


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen answer, rejected answer) from two whole sequences sharing a prefix (TRL's extract_prompt):
    the longest common prefix of messages, or of characters (a space right before the split stays with the answers)."""
    idx = 0
    n = min(len(chosen), len(rejected))
    while idx < n and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and 0 < idx < n and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def normalize_pair(row: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(``{"prompt", "chosen", "rejected"}`` with a string or message-list prompt, problem); problem None if fine."""
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            return None, f"no {key!r} field (every row needs 'chosen' and 'rejected'; 'prompt' is optional)"
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    chat = isinstance(chosen, list)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if chat:
            problem = _messages_problem(value, key)
            if problem:
                return None, problem
        elif not isinstance(value, str):
            return None, f"{key!r} is {type(value).__name__}: expected a string (or message lists for both answers)"
    if prompt is not None and chat and isinstance(prompt, list):
        problem = _messages_problem(prompt, "prompt")
        if problem:
            return None, problem
    elif prompt is not None and not chat and not isinstance(prompt, str):
        return None, f"'prompt' is {type(prompt).__name__}, but the answers are strings"
    if prompt is None or (chat and isinstance(prompt, str)):  # implicit prompt (beside chats, TRL ignores a string)
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if chosen != rejected:
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer or (chat and not any(m["content"] for m in answer)):
                return None, f"empty {key!r} answer: nothing to score"
            if chat and answer[-1]["role"] != "assistant":
                return None, f"{key!r} must end with an 'assistant' message"
    if chat:
        strip = lambda msgs: [{"role": m["role"], "content": m["content"]} for m in msgs]  # noqa: E731
        prompt, chosen, rejected = strip(prompt), strip(chosen), strip(rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def _file_rows(file: Path, field: str) -> Iterator[tuple[str, Any]]:
    if FORMATS.get(file.suffix.lower()) == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(file).to_pylist()):
            yield f"row {i}", row
    elif FORMATS.get(file.suffix.lower()) == "json":
        yield from json_rows(file, field)
    else:
        raise LMKitError(f"{field} {file}: preference data must be .jsonl, .json or .parquet")


def read_preference_rows(sources: Iterator[tuple[str, Any]], field: str) -> tuple[list[dict[str, Any]], int]:
    """(normalised rows, number of pairs dropped because chosen == rejected) from (``"FILE:LINE"``, row) pairs.

    The first bad row raises `LMKitError` naming ``field`` and where the row is. All rows must share one kind
    (strings or message lists), as the first row has.
    """
    rows: list[dict[str, Any]] = []
    identical = 0
    for where, row in sources:
        pair, problem = normalize_pair(row)
        if pair is not None and rows and isinstance(pair["chosen"], str) != isinstance(rows[0]["chosen"], str):
            problem = "mixes string and message-list rows (the first row decides the kind)"
        if problem:
            raise LMKitError(f"{field} {where}: {problem}")
        if pair["chosen"] == pair["rejected"]:
            identical += 1
            continue
        rows.append(pair)
    return rows, identical


def load_preference_rows(
    data_args: DataArguments, seed: int, source: Source | None = None
) -> dict[str, list[dict[str, Any]]]:
    """{"train": rows, "validation": rows} of one source: its files (with ``--validation_files``) or hub dataset.

    ``source`` is a `lmkit.mixture.Source` (`load_preference_sources` loads each of a mixture); None: the run's one
    source, ``--train_files`` or ``--dataset_name``. Without validation files (or a hub validation/test split),
    ``--validation_split`` of the pairs is held out at random with ``seed``. Pairs whose chosen equals rejected are
    dropped with a warning that counts them.
    """
    if source is None:
        (source,) = parse_sources(data_args)
    splits: dict[str, list[dict[str, Any]]] = {}
    if source.dataset_name is not None:
        from datasets import load_dataset

        hub = load_dataset(source.dataset_name, source.dataset_config_name)
        held = next((s for s in ("validation", "test") if s in hub), None) if source.split == "train" else None
        for split, name in {"train": source.split, "validation": held}.items():
            if name is not None:
                where = ((f"{source.dataset_name}[{name}] row {i}", r) for i, r in enumerate(hub[name]))
                splits[split] = _read_split(where, f"{source.flag('dataset_name')} {source.dataset_name}", split)
    else:
        if not source.files:
            raise LMKitError("--train_files is required: JSONL / parquet rows with 'chosen' and 'rejected'")
        for split, patterns, flag in (
            ("train", list(source.files), source.flag("files")),
            ("validation", data_args.validation_files, "--validation_files"),
        ):
            if patterns:
                files = resolve_data_files(patterns, flag)
                where = ((f"{file}:{w}", r) for file in files for w, r in _file_rows(file, flag))
                splits[split] = _read_split(where, flag, split)
    if not splits["train"]:
        raise LMKitError("training data: no preference pairs left (every pair's chosen equals its rejected)")
    if "validation" not in splits:
        rows = splits["train"]
        train, validation = hold_out_indices(
            len(rows), data_args.validation_split, seed, unit="pair", hint=_more_examples(source)
        )
        splits["train"], splits["validation"] = [rows[i] for i in train], [rows[i] for i in validation]
    named = "" if source.implicit else f" ({source.name})"
    logger.info("preference pairs%s: %d train, %d validation", named, len(splits["train"]), len(splits["validation"]))
    return splits


def load_preference_sources(data_args: DataArguments, seed: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every source's {"train", "validation"} rows (`load_preference_rows`), by name: the ``--datasets`` sources,
    or the one of ``--train_files`` / ``--dataset_name``."""
    return {s.name: load_preference_rows(data_args, seed, s) for s in parse_sources(data_args)}


def mix_preference_sources(
    datasets: dict[str, dict[str, Dataset]], data_args: DataArguments, seed: int
) -> dict[str, Dataset | dict[str, Dataset]]:
    """Each source's tokenized {"train", "validation"} pairs (reference log-probs added, if any) as the run's splits.

    One source: its splits as they are. Several: the training pairs mixed by weight (`lmkit.mixture.mix_blocks`:
    the order of `lmkit.mixture.source_choices`, ending when a source runs out; the realized mix is logged) and
    "validation" ``{name: that source's pairs}``, which `lmkit.trainer.LMTrainer.evaluate` reports as ``eval_loss``
    (over all pairs) and ``eval_<name>_loss``. Sources are mixed after tokenizing and scoring, so each source's
    tokens and reference log-probs are cached on their own and stay valid when the weights change.
    """
    sources = parse_sources(data_args)
    if len(sources) == 1:
        return datasets[sources[0].name]
    mixed, counts = mix_blocks({s.name: datasets[s.name]["train"] for s in sources}, sources, seed)
    log_mix(counts, sources, None, unit="pairs")
    held = {s.name: datasets[s.name]["validation"] for s in sources if "validation" in datasets[s.name]}
    return {"train": mixed, "validation": held} if held else {"train": mixed}


def _read_split(sources: Iterator[tuple[str, Any]], field: str, split: str) -> list[dict[str, Any]]:
    rows, identical = read_preference_rows(sources, field)
    if identical:
        logger.warning("%s: dropped %d pair(s) whose chosen answer equals the rejected one", split, identical)
    return rows


def is_conversational(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and not isinstance(rows[0]["chosen"], str)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------------------------


def _tokenize_side(prompt: Any, answer: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """prompt + answer -> ``{"input_ids", "labels"}`` as `lmkit.sft.tokenize_example` makes an SFT example; labels
    are -100 everywhere but the answer (and its EOS)."""
    if isinstance(answer, str):
        return tokenize_example({"prompt": prompt, "completion": answer}, tokenizer)
    n_prompt = len(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)) if prompt else 0
    input_ids: list[int] = []
    labels: list[int] = []
    done = 0
    for text, learn in chat_segments(prompt + answer, tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        learn = learn and done >= n_prompt  # assistant turns inside the prompt are context, not scored
        done += len(text)
        input_ids += ids
        labels += ids if learn else [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    if not input_ids or input_ids[-1] != eos:
        input_ids.append(eos)
        labels.append(eos)
    return {"input_ids": input_ids, "labels": labels}


def tokenize_pair(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, Any]:
    """One pair -> ``{chosen,rejected}_{input_ids,labels}``, cut to ``max_length`` tokens (keep the start), and
    ``status``: 0 kept, 1 kept but an answer was cut, 2 dropped (the prompt leaves no room for an answer)."""
    out: dict[str, Any] = {}
    status = 0
    for side in ("chosen", "rejected"):
        example = _tokenize_side(row["prompt"], row[side], tokenizer)
        first_answer = next(i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX)
        if first_answer >= max_length:
            status = 2
        elif len(example["input_ids"]) > max_length and status == 0:
            status = 1
        out[f"{side}_input_ids"] = example["input_ids"][:max_length]
        out[f"{side}_labels"] = example["labels"][:max_length]
    out["status"] = status
    return out


def tokenize_pairs(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list]:
    """`tokenize_pair` over a `datasets.map` batch (``batched=True``)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    pairs = [tokenize_pair(row, tokenizer, max_length) for row in rows]
    return {key: [pair[key] for pair in pairs] for key in pairs[0]} if pairs else {}


def cache_root(data_args: DataArguments) -> Path:
    import datasets

    return Path(data_args.cache_dir or datasets.config.HF_DATASETS_CACHE) / "lmkit_preference"


def build_preference_dataset(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    split: str = "train",
    cache_dir: Path | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Tokenize ``rows`` with a batched `datasets` ``.map`` in ``num_proc`` processes (cached under ``cache_dir``,
    keyed by the rows, the tokenizer (`lmkit.data`'s hash), its chat template, and ``max_length``); drop pairs
    whose prompt leaves no room, and log what was dropped / cut."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True).encode())
    template = tokenizer.chat_template or ""
    fingerprint = _fingerprint(
        _CACHE_VERSION, digest.hexdigest(), _tokenizer_hash(tokenizer), template, str(max_length)
    )
    map_kwargs: dict[str, Any] = {"new_fingerprint": fingerprint}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        map_kwargs["cache_file_name"] = str(cache_dir / f"tokenized-{fingerprint}.arrow")
    num_proc = min(num_proc, len(rows) // _PAIR_BATCH) if num_proc else None  # one process per batch at most
    dataset = Dataset.from_list(rows).map(
        tokenize_pairs,
        batched=True,
        batch_size=_PAIR_BATCH,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=["prompt", "chosen", "rejected"],
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc=f"Tokenizing {split} pairs",
        **map_kwargs,
    )
    status = dataset["status"]
    dropped, cut = status.count(2), status.count(1)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d pairs whose prompt leaves no room for an answer within --max_length %d",
            split, dropped, len(status), max_length,
        )  # fmt: skip
    if cut:
        logger.warning("%s: %d pairs had an answer cut at --max_length %d", split, cut, max_length)
    if dropped == len(status):
        raise LMKitError(f"{split}: every pair's prompt fills --max_length {max_length}; no answer could be scored")
    if dropped:
        keep = [i for i, s in enumerate(status) if s != 2]
        dataset = dataset.select(keep)
    dataset = dataset.remove_columns("status")
    logger.info("%s: %d preference pairs tokenized", split, len(dataset))
    return dataset


def build_preference_sources(
    rows: dict[str, dict[str, list[dict[str, Any]]]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    cache_dir: Path | None = None,
    num_proc: int | None = None,
) -> dict[str, dict[str, Dataset]]:
    """`build_preference_dataset` of every source's splits that hold pairs (`load_preference_sources`' rows)."""
    return {
        name: {
            split: build_preference_dataset(
                split_rows,
                tokenizer,
                max_length,
                split=split if len(rows) == 1 else f"{split} ({name})",
                cache_dir=cache_dir,
                num_proc=num_proc,
            )
            for split, split_rows in splits.items()
            if split_rows
        }
        for name, splits in rows.items()
    }


# ---------------------------------------------------------------------------------------------------------------
# Collating
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceCollator:
    """Batch B pairs into 2B sequences: the chosen ones (0 .. B-1), then the rejected ones (B .. 2B-1).

    Outputs ``input_ids``, ``targets`` (the next token at each position, -100 where nothing is scored: the shift
    happens here as in `lmkit.collator`) and ``sequence_ids`` (which of the 2B sequences each position belongs to).
    Unpacked: one right-padded row per sequence, with ``attention_mask`` when lengths differ. ``packing``: all 2B
    sequences in one padding-free row whose ``position_ids`` restart at 0 for each, so attention and rotary
    positions stay within each sequence (as finetune's ``--packing`` does). Reference log-probs ride along.
    Unpacked widths round up to a multiple of ``pad_to_multiple_of`` (`lmkit.collator.padded_width`).
    """

    pad_token_id: int
    packing: bool = False
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_args(cls, pad_token_id: int, ft_args: Any) -> PreferenceCollator:
        """The collator recipes/dpo.py trains with: ``--packing`` and ``--pad_to_multiple_of`` from FinetuneArguments."""
        return cls(pad_token_id, packing=ft_args.packing, pad_to_multiple_of=ft_args.pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        lengths = [len(s) - 1 for s in seqs]
        if self.packing:
            total = sum(lengths)
            batch = {
                "input_ids": torch.tensor([t for s in seqs for t in s[:-1]]).view(1, total),
                "targets": torch.tensor([t for lab in labels for t in lab[1:]]).view(1, total),
                "position_ids": torch.cat([torch.arange(n) for n in lengths]).view(1, total),
                "sequence_ids": torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths)).view(1, total),
            }
        else:
            width = padded_width(max(lengths), self.pad_to_multiple_of)
            batch = {
                "input_ids": torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long),
                "targets": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long),
                "sequence_ids": torch.arange(len(seqs))[:, None].expand(len(seqs), width).clone(),
            }
            for i, (seq, lab, n) in enumerate(zip(seqs, labels, lengths, strict=True)):
                batch["input_ids"][i, :n] = torch.tensor(seq[:-1])
                batch["targets"][i, :n] = torch.tensor(lab[1:])
            if min(lengths) != width:
                batch["attention_mask"] = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Log-probs from hidden states, chunk by chunk
# ---------------------------------------------------------------------------------------------------------------


def _scaled_logps(head: nn.Module, scale: float, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()  # (n, vocab)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, targets, reduction="none")  # (n,)


def token_logps(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """log p(target) for hidden (n, hidden) and targets (n,), ``chunk`` tokens at a time.

    With gradients on, each chunk runs under non-reentrant activation checkpointing: only its inputs are kept,
    and the backward recomputes its logits, so at most one chunk of logits is alive (as in the model's fused loss).
    """
    fn = functools.partial(_scaled_logps, head, scale, softcap)
    if hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return torch.cat([fn(hidden[s : s + chunk], targets[s : s + chunk]) for s in range(0, hidden.shape[0], chunk)])
    parts = [
        checkpoint(fn, hidden[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(parts)


def enable_token_logps(model: PreTrainedModel) -> PreTrainedModel:
    """Give ``model.forward`` a ``preference_targets`` mode returning the log-prob of every scored target.

    ``model(input_ids, ..., preference_targets=T)`` runs the backbone, takes the hidden states at positions where
    ``T != -100`` and returns their targets' log-probs, shape ``(n_scored,)`` in row-major order, without building
    the logits of a whole batch. Without the keyword the forward is the original one (generation is unchanged).
    Patch before wrapping with peft; the backbone and head are looked up per call (peft / FSDP replace them).
    """
    if getattr(model, "_lmkit_token_logps", False):
        return model
    original = model.forward
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None) or 1.0
    softcap = getattr(config, "final_logit_softcapping", None)
    chunk_override = getattr(config, "loss_chunk_tokens", None)

    @functools.wraps(type(model).forward)
    def forward(*args: Any, preference_targets: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if preference_targets is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(model, model.base_model_prefix)(*args, **kwargs).last_hidden_state  # (B, T, hidden)
        head = model.get_output_embeddings()
        mask = preference_targets != IGNORE_INDEX  # (B, T)
        vocab = head.weight.shape[0]
        chunk = chunk_override or max(1, _CHUNK_LOGITS // vocab)
        return token_logps(head, hidden[mask], preference_targets[mask], chunk, scale=scale, softcap=softcap)

    model.forward = forward
    model._lmkit_token_logps = True
    return model


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-prob, number of answer tokens) of each of the batch's 2B sequences, shape (2B,) each."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logps = model(**inputs, preference_targets=batch["targets"])  # (n_scored,)
    mask = batch["targets"] != IGNORE_INDEX
    seq = batch["sequence_ids"][mask]  # (n_scored,)
    n_seq = int(batch["sequence_ids"].max()) + 1
    sums = logps.new_zeros(n_seq, dtype=torch.float32).index_add(0, seq, logps.float())
    counts = torch.zeros(n_seq, dtype=torch.float32, device=logps.device).index_add(0, seq, torch.ones_like(logps))
    return sums, counts


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def preference_loss(
    args: PreferenceArguments,
    logps: torch.Tensor,
    counts: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over pairs, per-pair metric tensors) from the (2B,) summed log-probs and token counts of the
    chosen (first B) and rejected (last B) answers; ``ref_logps`` (2B,) for the reference-based losses.

    The formulas are TRL 1.16's (DPOTrainer sigmoid / ipo, CPOTrainer simpo, ORPOTrainer); ORPO's NLL here covers
    the chosen answer's tokens only, as in the ORPO paper (TRL's ORPOTrainer also counts the prompt's).
    """
    beta, eps = args.beta, args.label_smoothing
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = counts.clamp(min=1).chunk(2)
    if args.loss_type in ("sigmoid", "ipo"):
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if args.loss_type == "sigmoid":
            delta = beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
        else:  # per-token log-ratios (TRL normalises IPO by answer length), target margin 1 / (2 beta)
            losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
        rewards = (beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
        shown = (chosen, rejected)
        extra: dict[str, torch.Tensor] = {}
    else:
        avg_chosen, avg_rejected = chosen / n_chosen, rejected / n_rejected
        if args.loss_type == "simpo":
            delta = beta * (avg_chosen - avg_rejected) - args.simpo_gamma
            losses = -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
            extra = {}
        else:  # orpo
            log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
            ratio = F.logsigmoid(log_odds)
            nll = -chosen.sum() / n_chosen.sum()  # mean over the batch's chosen answer tokens
            losses = nll - beta * ratio
            extra = {  # TRL's ORPOTrainer names
                "nll_loss": nll.detach().expand_as(ratio),
                "log_odds_ratio": ratio.detach(),
                "log_odds_chosen": log_odds.detach(),
            }
        rewards = (beta * avg_chosen.detach(), beta * avg_rejected.detach())
        shown = (avg_chosen, avg_rejected)
    loss = losses.mean()
    if args.sft_weight:
        if args.loss_type == "orpo":  # recipes fit it first (`lmkit.dpo_args.fit_sft_weight`); library callers too
            raise ValueError("sft_weight with loss_type orpo would add the chosen answers' NLL twice")
        nll = -chosen.sum() / n_chosen.sum()  # TRL's "sft" term: mean over the batch's chosen answer tokens
        loss = loss + args.sft_weight * nll
        extra["nll_loss"] = nll.detach().expand_as(losses)
    metrics = {
        "rewards/chosen": rewards[0],
        "rewards/rejected": rewards[1],
        "rewards/accuracies": (rewards[0] > rewards[1]).float(),
        "rewards/margins": rewards[0] - rewards[1],
        "logps/chosen": shown[0].detach(),
        "logps/rejected": shown[1].detach(),
        **extra,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Reference log-probs: one pass before training, cached on disk
# ---------------------------------------------------------------------------------------------------------------


def model_key(spec: str, extra: str = "") -> str:
    """A key for the weights at ``spec``: a local folder's config and weight files (names, sizes, mtimes), else the
    hub id; ``extra`` adds what else changes the numbers (added tokens, precision)."""
    path = Path(spec)
    parts = [spec, extra]
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in (".safetensors", ".bin", ".json") and file.is_file():
                stat = file.stat()
                parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def full_parameters(model: nn.Module) -> Any:
    """Under DeepSpeed ZeRO-3 (weights sharded by zero.Init at load), gather every parameter for a forward outside
    the DeepSpeed engine: a collective, so every rank must enter it. Elsewhere nothing."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


@torch.no_grad()
def compute_reference_logps(
    model: PreTrainedModel, dataset: Dataset, collator: PreferenceCollator, batch_size: int, *, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probs of every pair under ``model`` (eval mode, no gradients)."""
    enable_token_logps(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                sums, _ = sequence_logps(model, batch)
            c, r = sums.cpu().chunk(2)
            chosen.append(c)
            rejected.append(r)
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def add_reference_logps(
    dataset: Dataset,
    model: PreTrainedModel,
    collator: PreferenceCollator,
    *,
    key: str,
    cache_dir: Path,
    batch_size: int,
    bf16: bool = False,
    split: str = "train",
) -> Dataset:
    """``dataset`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, read from the cache file for (``key``:
    the reference weights, dataset fingerprint) or computed with ``model`` and written there."""
    from safetensors.torch import load_file, save_file

    file = cache_dir / f"ref-{hashlib.sha256(f'{key}|{dataset._fingerprint}|{bf16}'.encode()).hexdigest()[:32]}.st"
    if file.is_file():
        logger.info("%s: reference log-probs from the cache %s", split, file)
        tensors = load_file(file)
        chosen, rejected = tensors["chosen"], tensors["rejected"]
    else:
        chosen, rejected = compute_reference_logps(model, dataset, collator, batch_size, bf16=bf16)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, tmp)
        os.replace(tmp, file)  # readers never see a half-written cache
        logger.info("%s: reference log-probs of %d pairs computed, cached in %s", split, len(dataset), file)
    if len(chosen) != len(dataset):
        raise LMKitError(f"reference cache {file}: {len(chosen)} pairs, the data has {len(dataset)}; delete it")
    dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
    return dataset.add_column("ref_rejected_logps", rejected.tolist())


def add_reference_logps_to_splits(
    datasets: dict[str, Dataset],
    ref_model: PreTrainedModel,
    collator: PreferenceCollator,
    args: Any,
    *,
    key: str,
    cache_dir: Path,
) -> dict[str, Dataset]:
    """Every split of ``datasets`` (a split may be ``{source: pairs}``) with its reference log-probs
    (`add_reference_logps`), on ``args.device``.

    Rank 0 scores and caches, the others then read the cache; under ZeRO-3 the sharded weights are gathered (a
    collective), so every rank scores at once (the full model must fit one device for this pass).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    settings = {"batch_size": args.per_device_eval_batch_size, "bf16": bool(args.bf16)}
    ref_model.to(args.device)
    first = contextlib.nullcontext() if is_deepspeed_zero3_enabled() else args.main_process_first(local=False)

    def score(split: str, data: Any) -> Any:  # a mixture's validation is {source: pairs}
        if isinstance(data, dict):
            return {name: score(f"{split}.{name}", part) for name, part in data.items()}
        return add_reference_logps(data, ref_model, collator, key=key, cache_dir=cache_dir, split=split, **settings)

    with first, full_parameters(ref_model):
        return {split: score(split, data) for split, data in datasets.items()}


def check_reference_tokenizer(ref_tokenizer: PreTrainedTokenizerBase, tokenizer_vocab: dict[str, int], spec: str):
    """The reference must score the same token ids: its vocabulary must equal the policy tokenizer's (as saved)."""
    ref_vocab = ref_tokenizer.get_vocab()
    if ref_vocab != tokenizer_vocab:
        only_ref = len(set(ref_vocab.items()) - set(tokenizer_vocab.items()))
        only_policy = len(set(tokenizer_vocab.items()) - set(ref_vocab.items()))
        raise LMKitError(
            f"--ref_model_name_or_path {spec}: its tokenizer differs from the policy's ({len(ref_vocab)} vs "
            f"{len(tokenizer_vocab)} tokens; {only_ref} / {only_policy} token ids not shared), so its log-probs "
            "would score other tokens"
        )


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


class PreferenceTrainer(LMTrainer):
    """`LMTrainer` whose loss is a preference loss over (chosen, rejected) pairs fed by `PreferenceCollator`.

    Overrides ``compute_loss`` (and ``prediction_step``, so evaluation scores the same loss: the stock one only
    computes a loss when a label column is present), and ``log``, which adds TRL's metric names averaged over the
    pairs since the last log: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected`` (``eval_``-prefixed in evaluation). The loss is a mean over pairs, so
    the Trainer divides it by the accumulation steps as usual. No perplexity: the loss is no token cross-entropy.
    """

    loss_is_token_cross_entropy = False

    def __init__(self, *args: Any, preference_args: PreferenceArguments, **kwargs: Any) -> None:
        training_args = kwargs.get("args") if "args" in kwargs else args[1]
        training_args.remove_unused_columns = False  # the pair columns are not forward() parameters
        super().__init__(*args, **kwargs)
        self.preference_args = preference_args
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        enable_token_logps(base)
        self._pair_metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        logps, counts = sequence_logps(model, inputs)
        ref = None
        if self.preference_args.needs_reference:
            if "ref_chosen_logps" not in inputs:
                raise LMKitError("preference data without reference log-probs (add_reference_logps was not run)")
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps)
        loss, metrics = preference_loss(self.preference_args, logps, counts, ref)
        mode = "train" if model.training else "eval"
        for name, values in metrics.items():
            gathered = self.accelerator.gather_for_metrics(values.detach().float().contiguous())
            total = self._pair_metrics[mode].setdefault(name, [0.0, 0.0])
            total[0] += gathered.sum().item()
            total[1] += gathered.numel()
        return (loss, {"logps": logps}) if return_outputs else loss

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, (total, count) in self._pair_metrics[mode].items():
            if count:
                logs[f"{prefix}{name}"] = total / count
        self._pair_metrics[mode] = {}
        super().log(logs, start_time)
