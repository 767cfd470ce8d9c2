"""Supervised fine-tuning data: prompt/completion and chat rows -> token ids with loss masks -> (packed) rows.

Three formats, told apart by what the files hold (the first row of the first file decides, every row is checked):

- raw text (``.txt``/``.parquet``, or JSONL rows without the keys below): continued pretraining, the pretraining
  pipeline of `lmkit.data`;
- ``{"prompt": str, "completion": str}``: ``prompt`` (with the tokenizer's usual leading specials) + ``completion``
  + EOS;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: rendered with a chat template.

Rows come out as the collator wants them: ``input_ids`` (n tokens) and ``labels`` (the same ids, -100 on tokens
that are not learned); packed rows also carry ``position_ids``. Loss falls on completion / assistant tokens only
(``--train_on_prompt`` learns everything), and every example ends in EOS, which is learned, so the model stops.

In memory, rows are loaded, tokenized and packed by `datasets` (batched ``map``s in ``--preprocessing_num_workers``
processes) and cached beside the loaded files, keyed by the files, the tokenizer, the chat template and the
settings, so a second run reads the cache and tokenizes nothing; a stream (`SFTStream`) is tokenized as it is read.

A mixture (``--datasets``) of such files builds each source on its own, its own validation rows held out, and
mixes the training rows by weight (`build_sft_datasets`, with `lmkit.mixture`); sources may differ in format.

The one rule for long examples: an example longer than ``--block_size + 1`` tokens is dropped, and the log says how
many were. Truncating would cut off the answer's end and teach the model not to stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from lmkit.args import DataArguments
from lmkit.collator import IGNORE_INDEX
from lmkit.data import (
    FORMATS,
    STREAMING_EVAL_BLOCKS,
    ContextFactory,
    _fingerprint,
    _tokenizer_hash,
    build_mixture,
    load_sources,
    resolve_data_files,
    share_stream_across_ranks,
)
from lmkit.errors import LMKitError
from lmkit.mixture import Source, StreamMix, log_mix, log_stream_mix, mix_blocks, parse_sources
from lmkit.packing import pack_examples, row_length
from lmkit.rows import chat_problem, hold_out_indices, is_held_out, is_json_array, json_rows, prompt_completion_problem

logger = logging.getLogger(__name__)

TEXT, PROMPT_COMPLETION, CHAT = "text", "prompt_completion", "chat"
_ROW_PROBLEM: dict[str, Callable[[Any], str | None]] = {
    PROMPT_COMPLETION: prompt_completion_problem,
    CHAT: chat_problem,
}
DEFAULT_CHAT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "chatml.jinja"
_SFT_BATCH = 1000  # examples per tokenize batch
_SFT_VERSION = "lmkit-sft-1"  # bump when tokenize/pack output changes, to invalidate old caches
_EXAMPLE = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})
_PACKED = Features({**_EXAMPLE, "position_ids": List(Value("int32"))})
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")  # chat markers such as <|im_start|> inside a template file


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking rows
# ---------------------------------------------------------------------------------------------------------------


def detect_format(files: list[Path], field: str = "--train_files") -> str:
    """``"text"``, ``"prompt_completion"`` or ``"chat"``, from the first JSON row of the first file (errors name
    ``field``)."""
    if FORMATS[files[0].suffix.lower()] != "json":
        return TEXT
    for _, row in json_rows(files[0], field):
        if isinstance(row, dict) and "messages" in row:
            return CHAT
        if isinstance(row, dict) and ("prompt" in row or "completion" in row):
            return PROMPT_COMPLETION
        return TEXT
    return TEXT


def read_sft_rows(files: list[Path], fmt: str, field: str) -> list[dict[str, Any]]:
    """Every row of ``files``, checked against ``fmt``; the first bad row raises `LMKitError` naming file and line."""
    rows = list(iter_sft_rows(files, fmt, field))
    if not rows:
        raise LMKitError(f"{field}: no examples in {', '.join(map(str, files))}")
    return rows


def iter_sft_rows(files: list[Path], fmt: str, field: str) -> Iterator[dict[str, Any]]:
    """`read_sft_rows` one row at a time: only the fields of ``fmt`` are kept."""
    for file in files:
        for where, row in json_rows(file, field):
            problem = _ROW_PROBLEM[fmt](row)
            if problem:
                raise LMKitError(f"{field} {file}:{where}: {problem}")
            if fmt == CHAT:
                yield {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
            else:
                yield {"prompt": row["prompt"], "completion": row["completion"]}


def source_format(source: Source) -> str:
    """One source's format (`detect_format` of its files); a hub dataset, or no files (the bundled corpus), is text."""
    if source.dataset_name is not None or not source.files:
        return TEXT
    field = source.flag("files")
    return detect_format(resolve_data_files(list(source.files), field), field)


def sft_format(data_args: DataArguments) -> str:
    """The task the data asks for: ``"text"`` (load it with `lmkit.data`), ``"prompt_completion"`` or ``"chat"``.

    A mixture (``--datasets``) is text when every source is. Otherwise every source must be SFT files, and it is
    ``"chat"`` when any source is (the chat template is needed then); a raw-text or hub source among SFT sources
    raises `LMKitError` naming its ``--datasets NAME.files`` (or ``.dataset_name``).
    """
    sources = parse_sources(data_args)
    formats = [source_format(s) for s in sources]
    sft = [s.name for s, fmt in zip(sources, formats, strict=True) if fmt != TEXT]
    if not sft:
        return TEXT
    for source, fmt in zip(sources, formats, strict=True):
        if fmt == TEXT and source.dataset_name is not None:
            raise LMKitError(
                f"{source.flag('dataset_name')} {source.dataset_name}: a hub dataset is read as raw text, which "
                f"cannot be mixed with the prompt/completion or chat sources ({', '.join(sft)}); give its examples "
                "as JSON-lines files"
            )
        if fmt == TEXT:
            raise LMKitError(
                f"{source.flag('files')}: raw text (no prompt/completion or messages rows), which cannot be mixed "
                f"with the prompt/completion or chat sources ({', '.join(sft)}); continue pretraining on text "
                "sources in a run of their own"
            )
    return CHAT if CHAT in formats else PROMPT_COMPLETION


def load_sft_rows(data_args: DataArguments, seed: int, source: Source | None = None) -> tuple[str, dict[str, Dataset]]:
    """(format, {"train": rows, "validation": rows}) of one source, as `Dataset`s that `datasets` loads (and caches:
    one Arrow file per set of files, keyed by their paths and mtimes).

    ``source`` is a `lmkit.mixture.Source` (`build_sft_datasets` loads each of a mixture); None: the run's one
    source, ``--train_files`` (with ``--validation_files``). The format is ``"text"`` (and no rows) when the files
    hold raw text: load those with `lmkit.data` instead. Without ``--validation_files``, ``--validation_split`` of
    the examples is held out at random with ``seed`` (``--validation_split 0``: no validation rows). Rows are
    checked as they are tokenized (`build_sft_datasets`).
    """
    if source is None:
        (source,) = parse_sources(data_args)
    fmt = source_format(source)
    if fmt == TEXT:
        return TEXT, {}
    field = source.flag("files")
    splits = {"train": _load_sft_files(list(source.files), fmt, field, data_args)}
    if data_args.validation_files:
        splits["validation"] = _load_sft_files(data_args.validation_files, fmt, "--validation_files", data_args)
    else:
        rows = splits["train"]
        with _naming_the_bad_row(resolve_data_files(list(source.files), field), fmt, field):
            # (a bad row is the error to report first)
            keep, held = hold_out_indices(
                len(rows), data_args.validation_split, seed, unit="example", hint=_more_examples(source)
            )
        splits["train"], splits["validation"] = rows.select(keep), rows.select(held)
    logger.info(
        "SFT data (%s): %d train, %d validation examples",
        _kind(source, fmt), len(splits["train"]), len(splits["validation"]),
    )  # fmt: skip
    return fmt, splits


def _named(source: Source) -> str:
    """What a split's log lines add to its name: nothing for the one source of a plain run."""
    return "" if source.implicit else f" ({source.name})"


def _kind(source: Source, fmt: str) -> str:
    return fmt if source.implicit else f"{source.name}, {fmt}"


def _more_examples(source: Source) -> str:
    """How to get validation examples when too few are held out (a mixture takes no --validation_files)."""
    return "pass --validation_files" if source.implicit else f"add examples to {source.flag('files')}"


def _load_sft_files(patterns: list[str], fmt: str, field: str, data_args: DataArguments) -> Dataset:
    """The rows of ``patterns`` as a `Dataset` of the ``fmt`` columns (other keys are ignored)."""
    files = resolve_data_files(patterns, field)
    columns = ["messages"] if fmt == CHAT else ["prompt", "completion"]
    with _naming_the_bad_row(files, fmt, field):
        ds = datasets.load_dataset(
            "json", data_files={"train": [str(f) for f in files]}, split="train", cache_dir=data_args.cache_dir
        )
        if len(ds) == 0 or not set(columns) <= set(ds.column_names):
            raise LMKitError(f"{field}: no examples, or no {' / '.join(columns)} column")
    return ds.select_columns(columns)


@contextlib.contextmanager
def _naming_the_bad_row(files: list[Path], fmt: str, field: str) -> Iterator[None]:
    """On any error (a `datasets` parse error names neither file nor line; a row check inside ``map`` has no line
    to name), read the files with `read_sft_rows`, which raises the one-line error naming the first bad row."""
    try:
        yield
    except Exception:
        read_sft_rows(files, fmt, field)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------------


def resolve_chat_template(path: str | None, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[str]]:
    """(template text, chat markers it uses that the tokenizer lacks) for ``--chat_template``.

    ``path`` None: the tokenizer's own template, else lmkit's default ChatML file. Markers like ``<|im_start|>``
    in a template file become special tokens, so they are one token each (the caller adds them and resizes).
    """
    if path is None and tokenizer.chat_template:
        return tokenizer.chat_template, []
    file = Path(path).expanduser() if path else DEFAULT_CHAT_TEMPLATE
    if not file.is_file():
        raise LMKitError(f"--chat_template {path}: no such file")
    template = file.read_text(encoding="utf-8")
    vocab = tokenizer.get_vocab()
    markers = [m for m in dict.fromkeys(_MARKER.findall(template)) if m not in vocab]
    return template, markers


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant's content, if there is one.

    Generation should stop there too (multi-turn examples end inner answers with it, not with EOS).
    """
    probe = "\x00probe\x00"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text.split(probe, 1)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return ids[0] if ids and ids[0] in tokenizer.all_special_ids else None


def chat_segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces: each assistant turn is an answer piece.

    Works for any template that renders a conversation's prefix as a prefix of the whole (all common ones do):
    the answer is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True).
    """
    return chat_segments_batch([messages], tokenizer)[0]


def chat_segments_batch(
    conversations: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerBase
) -> list[list[tuple[str, bool]]]:
    """`chat_segments` of each conversation, rendered in two `apply_chat_template` calls (with and without the
    generation prompt) rather than two per answer: the same strings, a fifth faster."""
    # (conversation, prefix length, with the generation prompt) of every render the segments need
    wanted: list[tuple[int, int, bool]] = []
    for c, messages in enumerate(conversations):
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                wanted += [(c, i, True), (c, i + 1, False)]
        if messages[-1]["role"] != "assistant":
            wanted.append((c, len(messages), False))
    render = _fast_render(tokenizer, conversations[0])
    rendered: dict[tuple[int, int, bool], str] = {}
    for prompt in (True, False):
        keys = [(c, n, p) for c, n, p in wanted if p == prompt and n > 0]
        if keys and render is not None:
            rendered.update((key, render(conversations[key[0]][: key[1]], prompt)) for key in keys)
        elif keys:
            texts = tokenizer.apply_chat_template(
                [conversations[c][:n] for c, n, _ in keys], tokenize=False, add_generation_prompt=prompt
            )
            rendered.update(zip(keys, texts, strict=True))
    out = []
    for c, messages in enumerate(conversations):
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix, full = rendered.get((c, i, True), ""), rendered[(c, i + 1, False)]
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise LMKitError(
                    "--chat_template: the template does not render a conversation's beginning as a prefix of the "
                    "whole conversation, so answer tokens cannot be told apart; use a prefix-stable template"
                )
            segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
            done = full
        rest = rendered[(c, len(messages), False)][len(done) :]
        if rest:
            segments.append((rest, False))
        out.append([s for s in segments if s[0]])
    return out


def _fast_render(
    tokenizer: PreTrainedTokenizerBase, probe: list[dict[str, str]]
) -> Callable[[list[dict[str, str]], bool], str] | None:
    """The chat template's compiled Jinja render, as `apply_chat_template(tokenize=False)` calls it, or None.

    `apply_chat_template` copies and normalizes every conversation before rendering it (dropping None-valued keys,
    aliasing reasoning fields, converting message objects): over half its time, and a no-op for SFT rows, which
    hold only string ``role`` / ``content`` pairs. This renders them directly, three times faster, with the same
    compiled template and arguments; it is used only when it renders ``probe`` exactly as `apply_chat_template`
    does (else None: a template string this cannot reproduce, or a transformers without these helpers).
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data
    except ImportError:
        return None
    if not isinstance(tokenizer.chat_template, str):
        return None
    compiled = _compile_jinja_template(tokenizer.chat_template)
    kwargs = _plain_template_data(dict(tokenizer.special_tokens_map))

    def render(messages: list[dict[str, str]], prompt: bool) -> str:
        return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=prompt, **kwargs)

    try:
        same = all(
            render(probe, p) == tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=p)
            for p in (False, True)
        )
    except Exception:  # a template that raises on the probe raises the same way in apply_chat_template below
        return None
    return render if same else None


# ---------------------------------------------------------------------------------------------------------------
# Tokenize, mask, pack
# ---------------------------------------------------------------------------------------------------------------


def tokenize_example(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """One prompt/completion or chat row -> ``{"input_ids", "labels"}``; labels are -100 on unlearned tokens.

    A chat row needs ``tokenizer.chat_template`` set. The example always ends in EOS, learned as the answer's end.
    """
    pieces = [(tokenizer(text, add_special_tokens=specials)["input_ids"], learn)
              for text, learn, specials in _pieces(row, tokenizer)]  # fmt: skip
    return _join_pieces(pieces, tokenizer.eos_token_id, train_on_prompt)


def tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool, max_tokens: int
) -> dict[str, list[list[int]]]:
    """`tokenize_example` for a `datasets.map` batch (``batched=True``), each row checked first; examples over
    ``max_tokens`` are left out. All the batch's pieces go through the tokenizer in two calls (with and without
    the leading specials), which gives the ids one call per piece gives, several times faster."""
    fmt = CHAT if "messages" in batch else PROMPT_COMPLETION
    rows = [{key: values[i] for key, values in batch.items()} for i in range(len(next(iter(batch.values()))))]
    for i, row in enumerate(rows):
        if (problem := _ROW_PROBLEM[fmt](row)) is not None:
            raise LMKitError(f"example {i} of a batch: {problem}")
        if fmt == CHAT:  # `datasets` gives every message every key seen in the file (None where absent)
            row["messages"] = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    segments = chat_segments_batch([row["messages"] for row in rows], tokenizer) if fmt == CHAT else None
    pieces = [_pieces(row, tokenizer, segments[i] if segments else None) for i, row in enumerate(rows)]
    ids = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for specials in (False, True):
        texts = [text for row in pieces for text, _, with_specials in row if with_specials == specials]
        if backend is not None:  # the Rust batch encoder without offsets (as `lmkit.packing.tokenize_documents`)
            ids[specials] = iter([e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=specials)])
        else:
            ids[specials] = iter(tokenizer(texts, add_special_tokens=specials)["input_ids"] if texts else [])
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for row in pieces:
        example = _join_pieces([(next(ids[s]), learn) for _, learn, s in row], tokenizer.eos_token_id, train_on_prompt)
        if len(example["input_ids"]) <= max_tokens:
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
    return out


def _pieces(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]] | None = None
) -> list[tuple[str, bool, bool]]:
    """(text, is_answer, tokenized with the tokenizer's usual leading specials) pieces of one example; a chat row's
    ``segments`` are `chat_segments`' (computed here when not given)."""
    if "messages" in row:
        segments = chat_segments(row["messages"], tokenizer) if segments is None else segments
        return [(text, learn, False) for text, learn in segments]
    return [(row["prompt"], False, True), (row["completion"], True, False)]  # the prompt gets e.g. BOS


def _join_pieces(pieces: list[tuple[list[int], bool]], eos: int, train_on_prompt: bool) -> dict[str, list[int]]:
    if not pieces[-1][0] or pieces[-1][0][-1] != eos:
        pieces.append(([eos], True))
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, learn in pieces:
        input_ids += ids
        labels += ids if (learn or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def build_sft_dataset(
    rows: list[dict[str, Any]] | Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    train_on_prompt: bool = False,
    packing: bool = False,
    split: str = "train",
    num_proc: int | None = None,
    reuse_cache: bool = True,
) -> Dataset:
    """Tokenize and mask ``rows``, drop examples over ``block_size + 1`` tokens (logged), pack when asked.

    Both steps are `datasets.map`s, so rows loaded from files (`load_sft_rows`) are cached beside them, keyed by
    the rows' fingerprint, the tokenizer (`lmkit.data` hashes it), the chat template and the settings: a second
    run with the same inputs reads the cache (unless not ``reuse_cache``) and tokenizes nothing.
    """
    if not isinstance(rows, Dataset):
        rows = Dataset.from_list(rows)
    max_tokens = row_length(block_size)
    # At most one process per batch; one process is this one (datasets would start a pool of one).
    num_proc = min(num_proc, len(rows) // _SFT_BATCH) if num_proc else None
    num_proc = num_proc if num_proc and num_proc > 1 else None
    settings = f"template={tokenizer.chat_template}|train_on_prompt={train_on_prompt}|max_tokens={max_tokens}"
    examples = rows.map(
        tokenize_batch,
        batched=True,
        batch_size=_SFT_BATCH,
        remove_columns=rows.column_names,
        features=_EXAMPLE,
        fn_kwargs={"tokenizer": tokenizer, "train_on_prompt": train_on_prompt, "max_tokens": max_tokens},
        num_proc=num_proc,
        load_from_cache_file=reuse_cache,
        new_fingerprint=_fingerprint(_SFT_VERSION, rows._fingerprint, _tokenizer_hash(tokenizer), settings),
        desc=f"Tokenizing {split}",
    )
    counts = _Counts()
    counts.seen, counts.kept = len(rows), len(examples)
    counts.report(split, max_tokens)
    if packing:
        # Greedy packing is sequential (a row's first example depends on every example before it), so it is one
        # batch; cached all the same.
        examples = examples.map(
            _pack_batch,
            batched=True,
            batch_size=None,
            features=_PACKED,
            fn_kwargs={"max_tokens": max_tokens, "pad_token_id": tokenizer.pad_token_id},
            load_from_cache_file=reuse_cache,
            new_fingerprint=_fingerprint(examples._fingerprint, f"pack|pad={tokenizer.pad_token_id}"),
            desc=f"Packing {split}",
        )
    logger.info("%s: %d examples -> %d rows%s", split, counts.kept, len(examples), " (packed)" * packing)
    return examples


def _pack_batch(batch: dict[str, list[list[int]]], max_tokens: int, pad_token_id: int) -> dict[str, list[Any]]:
    examples = ({"input_ids": ids, "labels": labels} for ids, labels in zip(*batch.values(), strict=True))
    rows = list(pack_examples(examples, max_tokens, pad_token_id))
    return {key: [row[key] for row in rows] for key in _PACKED}


class _Counts:
    """Examples seen and dropped for being too long; `report` logs the drops and refuses a split with none left."""

    def __init__(self) -> None:
        self.seen = self.kept = 0

    def report(self, split: str, max_tokens: int) -> None:
        dropped = self.seen - self.kept
        if dropped:
            logger.warning(
                "%s: dropped %d of %d examples longer than --block_size + 1 = %d tokens",
                split, dropped, self.seen, max_tokens,
            )  # fmt: skip
        if self.seen and not self.kept:
            raise LMKitError(f"{split}: every example is longer than --block_size + 1 = {max_tokens} tokens")


def _fitting(examples: Iterable[dict[str, list[int]]], max_tokens: int, counts: _Counts) -> Iterator[dict[str, Any]]:
    for example in examples:
        counts.seen += 1
        if len(example["input_ids"]) <= max_tokens:
            counts.kept += 1
            yield example


# ---------------------------------------------------------------------------------------------------------------
# Train and validation sets, in memory or streamed
# ---------------------------------------------------------------------------------------------------------------


def build_sft_datasets(
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on_prompt: bool = False,
    packing: bool = False,
    seed: int = 42,
    main_process_first: ContextFactory = contextlib.nullcontext,
) -> dict[str, Any]:
    """{"train", "validation"} for prompt/completion or chat files; validation is None when none is held out.

    Each source (``--datasets``, or the one of ``--train_files``) is tokenized, packed and split on its own
    (`_source_datasets`). One source is returned as it is. Several: their training rows are mixed by weight in the
    order of `lmkit.mixture.source_choices`, ending when a source runs out (`lmkit.mixture.mix_blocks`; streamed,
    `lmkit.mixture.StreamMix`, which gives the same order), and the realized mix is logged; validation is
    ``{name: that source's held-out rows}``, which `lmkit.trainer.LMTrainer.evaluate` reports as ``eval_loss``
    and ``eval_<name>_loss``. A source may be prompt/completion or chat: both give the same columns.

    Packing (``packing``) happens per source, before mixing: a row then holds one source's examples, so the mix
    counts whole rows of each source, each source's eval loss is its own, and a source's packed rows stay cached
    when the weights change. Packed rows all hold ``--block_size + 1`` tokens, so packed weights share tokens;
    unpacked, they share examples.
    """
    kwargs = {"train_on_prompt": train_on_prompt, "packing": packing}
    sources = parse_sources(data_args)
    built = {s.name: _source_datasets(data_args, s, tokenizer, seed, main_process_first, **kwargs) for s in sources}
    if len(sources) == 1:
        return built[sources[0].name]
    train = {name: parts["train"] for name, parts in built.items()}
    if data_args.streaming:
        mixed = StreamMix(train, sources, seed)
        log_stream_mix(mixed, unit="rows")
        mixed = share_stream_across_ranks(mixed)
    else:
        mixed, counts = mix_blocks(train, sources, seed)
        log_mix(counts, sources, {name: _target_tokens(train[name], n) for name, n in counts.items()}, unit="rows")
    held = {name: parts["validation"] for name, parts in built.items() if parts["validation"] is not None}
    return {"train": mixed, "validation": held or None}


def _target_tokens(rows: Dataset, n: int) -> int:
    """Tokens with a label in the first ``n`` of ``rows``: what the loss of the rows is taken over."""
    labels = pc.list_flatten(rows.select(range(n)).with_format("arrow")["labels"])
    return len(labels) - pc.sum(pc.equal(labels, IGNORE_INDEX)).as_py() if len(labels) else 0


def _source_datasets(
    data_args: DataArguments,
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    main_process_first: ContextFactory,
    **kwargs: bool,
) -> dict[str, Dataset | SFTStream | None]:
    """One source's {"train", "validation"} (`build_sft_datasets`).

    In memory: the files are loaded and tokenized by `datasets` and cached (`build_sft_dataset`), inside
    ``main_process_first`` (e.g. ``training_args.main_process_first``) so rank 0 builds the cache and the other
    ranks read it. With ``--streaming``, train is an `SFTStream` and validation a `Dataset` of at most
    ``--max_eval_blocks`` (default 1024) examples: the first ones of ``--validation_files``, else the rows of the
    training files that a seeded hash holds out (``--validation_split`` of them; the stream skips those).
    """
    field, named = source.flag("files"), _named(source)
    if not data_args.streaming:
        with main_process_first():  # rank 0 loads and tokenizes; the others then read its cache
            fmt, rows = load_sft_rows(data_args, seed, source)
            out: dict[str, Dataset | SFTStream | None] = {}
            for split, split_rows in rows.items():
                own_files = split == "validation" and data_args.validation_files
                where = "--validation_files" if own_files else field
                files = resolve_data_files(data_args.validation_files if own_files else list(source.files), where)
                with _naming_the_bad_row(files, fmt, where):
                    out[split] = build_sft_dataset(
                        split_rows, tokenizer, data_args.block_size, split=split + named, **kwargs,
                        num_proc=data_args.preprocessing_num_workers, reuse_cache=not data_args.overwrite_cache,
                    ) if len(split_rows) else None  # fmt: skip
        return out
    train_files = resolve_data_files(list(source.files), field)
    fmt = detect_format(train_files, field)
    hold_out = None if data_args.validation_files else (seed, data_args.validation_split)
    train = share_stream_across_ranks(
        SFTStream(train_files, fmt, tokenizer, data_args.block_size, hold_out=hold_out, field=field, **kwargs)
    )
    n_eval = data_args.max_eval_blocks or STREAMING_EVAL_BLOCKS
    if data_args.validation_files:
        val_files = resolve_data_files(data_args.validation_files, "--validation_files")
        val_rows = list(islice(_streamed_rows(val_files, fmt, "--validation_files"), n_eval))
        if not val_rows:
            raise LMKitError(f"--validation_files: no examples in {', '.join(map(str, val_files))}")
    elif data_args.validation_split > 0:
        rows = _streamed_rows(train_files, fmt, field)
        val_rows = list(islice((r for r in rows if is_held_out(_row_text(r), *hold_out)), n_eval))
        if not val_rows:
            raise LMKitError(
                f"--validation_split {data_args.validation_split}: no example of {field} was held out "
                f"(too few rows); raise it or {_more_examples(source)}"
            )
    else:
        logger.info("SFT data (%s): streamed train, no validation examples", _kind(source, fmt))
        return {"train": train, "validation": None}
    validation = build_sft_dataset(val_rows, tokenizer, data_args.block_size, split="validation" + named, **kwargs)
    logger.info("SFT data (%s): streamed train, %d validation examples", _kind(source, fmt), len(val_rows))
    return {"train": train, "validation": validation}


def build_finetune_datasets(
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    fmt: str,
    *,
    train_on_prompt: bool = False,
    packing: bool = False,
    seed: int = 42,
    main_process_first: ContextFactory = contextlib.nullcontext,
) -> dict[str, Any]:
    """recipes/finetune.py's {"train", "validation"} for the data's ``fmt`` (`sft_format`): raw text continues
    pretraining, each source packed into blocks and mixed as recipes/pretrain.py does (`lmkit.data.build_mixture`);
    prompt/completion and chat rows come from `build_sft_datasets`."""
    if fmt == TEXT:
        raws = load_sources(data_args, seed, main_process_first)
        return build_mixture(raws, tokenizer, data_args, seed, main_process_first)
    return build_sft_datasets(
        data_args, tokenizer, train_on_prompt=train_on_prompt, packing=packing, seed=seed,
        main_process_first=main_process_first,
    )  # fmt: skip


def _streamed_rows(files: list[Path], fmt: str, field: str) -> Iterator[dict[str, Any]]:
    _check_streamable(files, field)
    return iter_sft_rows(files, fmt, field)


def _check_streamable(files: list[Path], field: str) -> None:
    for file in files:
        if is_json_array(file):
            raise LMKitError(
                f"--streaming: {field} {file} holds one JSON array, which can only be read whole; "
                "write it as JSON lines (one object per line) to stream it"
            )


def _row_text(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


class SFTStream(torch.utils.data.IterableDataset):
    """Prompt/completion or chat examples streamed from JSON-lines files: each row is read, checked, tokenized,
    masked and (with ``packing``) packed only when training asks for it, so nothing is held in memory.

    For the same rows it yields exactly the rows `build_sft_dataset` holds, in file order (a stream is not
    shuffled). ``hold_out=(seed, fraction)`` skips the rows `lmkit.rows.is_held_out` puts in the validation split.
    Examples over ``block_size + 1`` tokens are dropped, and the count is logged at the end of every pass.
    A resumed run replays the stream up to its step: it keeps no position (`lmkit.checkpoint.ResumableData`),
    since packing carries examples across rows. A mixture's streams are mixed by `lmkit.mixture.StreamMix`, which
    replays the same way. ``field`` is the flag its errors name (``--datasets NAME.files`` in a mixture).
    """

    def __init__(
        self,
        files: list[Path],
        fmt: str,
        tokenizer: PreTrainedTokenizerBase,
        block_size: int,
        *,
        train_on_prompt: bool = False,
        packing: bool = False,
        hold_out: tuple[int, float] | None = None,
        field: str = "--train_files",
    ) -> None:
        self.files, self.fmt, self.tokenizer, self.block_size = files, fmt, tokenizer, block_size
        self.train_on_prompt, self.packing = train_on_prompt, packing
        self.hold_out = hold_out if hold_out and hold_out[1] > 0 else None
        self.field = field
        _check_streamable(files, field)  # now, not at the first training step

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.id > 0:
            return  # one stream, one reader (as `lmkit.data.PackedStream`)
        rows: Iterable[dict[str, Any]] = _streamed_rows(self.files, self.fmt, self.field)
        if self.hold_out is not None:
            rows = (row for row in rows if not is_held_out(_row_text(row), *self.hold_out))
        max_tokens, counts = row_length(self.block_size), _Counts()
        examples = (tokenize_example(row, self.tokenizer, self.train_on_prompt) for row in rows)
        fitting = _fitting(examples, max_tokens, counts)
        yield from pack_examples(fitting, max_tokens, self.tokenizer.pad_token_id) if self.packing else fitting
        if not counts.seen:
            raise LMKitError(f"{self.field}: no training examples in {', '.join(map(str, self.files))}")
        counts.report("train" if self.field == "--train_files" else f"train ({self.field})", max_tokens)
