"""Held-out loss, perplexity and bits per byte of a causal LM, in blocks or with a sliding window.

The text becomes one token stream exactly as training builds it (each document's tokens, then EOS, all
concatenated). It is then cut into windows:

- ``stride=None``: non-overlapping blocks of ``context + 1`` tokens, the trailing remainder dropped -- the blocks
  `lmkit.data.build_lm_datasets` makes, so the loss equals the trainer's ``eval_loss`` for the same context.
- ``stride=S``: windows of up to ``context + 1`` tokens starting every S tokens; each window scores only the
  targets that earlier windows did not, so every token after the first is scored exactly once, with at least
  ``context - S`` tokens before it (the Hugging Face perplexity guide's method, stride <= context).

Each window contributes its summed nats, its scored-token count and the UTF-8 bytes those tokens spell to the
``lm_loss`` metric module (lmkit/metrics/lm_loss, loaded by path with `evaluate.load`), which returns
loss = nats / tokens, perplexity = exp(loss) and bits per byte = nats / (ln 2 * bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import evaluate
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmkit.collator import IGNORE_INDEX, CausalLMCollator
from lmkit.errors import LMKitError
from lmkit.packing import join_documents

logger = logging.getLogger(__name__)

METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "lm_loss")


@dataclass(frozen=True)
class Window:
    """Tokens ``stream[start:end]`` go through the model; targets at stream positions >= ``first_scored`` count."""

    start: int
    end: int
    first_scored: int


@dataclass
class TokenStream:
    """Token ids and, per token, the UTF-8 bytes of text it accounts for (0 for the EOS after each document)."""

    ids: list[int]
    nbytes: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def token_stream(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> TokenStream:
    """Every document's tokens followed by EOS, concatenated (`lmkit.packing.join_documents`, as training does).

    Bytes come from the text through the tokenizer's character offsets, so a document's tokens account for
    exactly its UTF-8 bytes (unknown-character tokens and characters split across byte-level tokens included).
    Tokenizers without offsets (slow ones) count the bytes of each decoded token instead.
    """
    if tokenizer.eos_token_id is None:
        raise LMKitError("the tokenizer has no EOS token to separate documents")
    ids_per_doc, nbytes_per_doc = [], []
    for text in texts:
        if tokenizer.is_fast:
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, starts = encoding["input_ids"], [start for start, _ in encoding["offset_mapping"]]
            byte_at = [0, *accumulate(len(c.encode("utf-8")) for c in text)]  # byte offset of each character
            bounds = [0, *starts[1:], len(text)]  # a token owns the text up to the next token's start
            nbytes = [byte_at[bounds[i + 1]] - byte_at[bounds[i]] for i in range(len(ids))]
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            nbytes = [len(tokenizer.decode([i]).encode("utf-8")) for i in ids]
        ids_per_doc.append(ids)
        nbytes_per_doc.append(nbytes)
    ids, _ = join_documents(ids_per_doc, tokenizer.eos_token_id)
    nbytes, _ = join_documents(nbytes_per_doc, 0)  # the EOS after each document spells no text
    return TokenStream(ids.tolist(), nbytes.tolist())


def block_windows(n_tokens: int, context: int) -> list[Window]:
    """Disjoint blocks of ``context + 1`` tokens, each scoring its ``context`` targets; the tail is dropped."""
    block = context + 1
    return [Window(s, s + block, s + 1) for s in range(0, n_tokens - block + 1, block)]


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows of up to ``context + 1`` tokens every ``stride`` tokens; each target (positions 1..n-1) scored once."""
    if not 1 <= stride <= context:
        raise LMKitError(f"--stride {stride} must be between 1 and the context {context}")
    windows, start, next_target = [], 0, 1
    while next_target < n_tokens:
        end = min(start + context + 1, n_tokens)
        windows.append(Window(start, end, next_target))
        next_target, start = end, start + stride
    return windows


@torch.no_grad()
def score_windows(
    model: PreTrainedModel,
    stream: TokenStream,
    windows: list[Window],
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> Iterator[dict[str, list]]:
    """Yield, per batch of windows, ``{"nats": [...], "tokens": [...], "bytes": [...]}`` (one entry per window).

    Batches come from `CausalLMCollator`, as in training: rows are right-padded only when their lengths differ, so
    equal blocks take the same attention path. The cross-entropy is taken in fp32 on the model's logits, as the
    model's own loss does, against the batch's ``shift_labels``.
    """
    device = model.device
    collate = CausalLMCollator(pad_token_id)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        rows = []
        for w in batch:
            ids = stream.ids[w.start : w.end]
            scored = w.first_scored - w.start  # the targets before this one were scored by an earlier window
            rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * scored + ids[scored:]})
        collated = collate(rows)
        inputs = {k: collated[k].to(device) for k in ("input_ids", "attention_mask") if k in collated}
        targets = collated["shift_labels"]  # (B, T)
        logits = model(**inputs, use_cache=False).logits  # (B, T, vocab)
        nats = F.cross_entropy(
            logits.float().transpose(1, 2), targets.to(device), ignore_index=IGNORE_INDEX, reduction="none"
        ).sum(dim=1)  # (B,)
        yield {
            "nats": nats.double().tolist(),
            "tokens": (targets != IGNORE_INDEX).sum(dim=1).tolist(),
            "bytes": [sum(stream.nbytes[w.first_scored : w.end]) for w in batch],
        }


def evaluate_stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stream: TokenStream,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Loss, perplexity, bits per byte (and token/byte/window counts) of ``model`` on a token stream.

    ``stride=None`` scores non-overlapping training blocks; see the module docstring for both methods.
    """
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and context > max_positions:
        raise LMKitError(f"--context {context} exceeds the model's max_position_embeddings {max_positions}")
    if stride is None:
        windows = block_windows(len(stream), context)
        if not windows:
            raise LMKitError(
                f"the evaluation text is {len(stream)} tokens, shorter than one block of --context + 1 = "
                f"{context + 1}: pass --stride to score it with a sliding window, or a shorter --context"
            )
    else:
        if stride > context:
            raise LMKitError(f"--stride {stride} is larger than the context {context} (tokens would go unscored)")
        windows = sliding_windows(len(stream), context, stride)
        if not windows:
            raise LMKitError("the evaluation text is a single token: nothing to predict")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metric = evaluate.load(METRIC_PATH)
    was_training = model.training
    model.eval()
    try:
        for batch in score_windows(model, stream, windows, batch_size, pad):
            metric.add_batch(**batch)
    finally:
        model.train(was_training)
    results = metric.compute()
    results.update(windows=len(windows), context=context, stride=stride)
    return results
