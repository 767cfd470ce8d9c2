"""Tokenizers: train a byte-level BPE or a character-level one on the corpus, or load an existing one.

Every tokenizer this module returns has ``bos``, ``eos`` and ``pad`` tokens, with ``pad`` distinct from ``eos``
(the collator masks padding out of the loss, so it must never be mistaken for a document boundary).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmkit.errors import LMKitError
from lmkit.hub import local_path

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # also the BOS token, as in GPT-2: one boundary marker between documents
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"  # char tokenizer only: characters never seen in training; byte-level BPE needs none
DEFAULT_VOCAB_SIZE = 8192
VOCAB_MULTIPLE = 64  # a new model's embedding rows: the tokenizer's size rounded up to this
_BATCH = 1000


def build_tokenizer(
    spec: str,
    texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
    *,
    min_frequency: int = 2,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> PreTrainedTokenizerFast:
    """Return the tokenizer named by ``spec`` (the ``--tokenizer`` flag).

    Args:
        spec: ``"train"`` trains a byte-level BPE on ``texts``; ``"char"`` builds a character-level tokenizer whose
            vocabulary is the set of characters in ``texts``; anything else is a local path or hub id loaded with
            `AutoTokenizer`.
        texts: The training documents (needed by ``"train"`` and ``"char"``, ignored otherwise).
        vocab_size: Target vocabulary size of ``"train"`` (specials included). None: 8192.
        min_frequency: Minimum pair count for a BPE merge.
        trust_remote_code: Passed to `AutoTokenizer` for hub tokenizers that ship code.
        cache_dir: Hub download cache.

    ``"train"`` and ``"char"`` decode back to exactly the text they encode (for ``"char"``: when every character
    was seen in ``texts``). Raises `LMKitError` naming ``--tokenizer`` when a path/hub id cannot be loaded.
    """
    if spec in ("train", "char"):
        if texts is None:
            raise LMKitError(f"--tokenizer {spec} needs training texts to build a vocabulary from")
        backend = (
            train_bpe(texts, vocab_size or DEFAULT_VOCAB_SIZE, min_frequency) if spec == "train" else _char(texts)
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=EOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            unk_token=UNK_TOKEN if spec == "char" else None,
            clean_up_tokenization_spaces=False,
            model_max_length=int(1e30),
        )
        logger.info("Built a %s tokenizer with %d tokens", "BPE" if spec == "train" else "char", len(tokenizer))
        return tokenizer
    return _load(spec, trust_remote_code=trust_remote_code, cache_dir=cache_dir)


def model_vocab_size(tokenizer: PreTrainedTokenizerBase, vocab_size: int | None, spec: str) -> int:
    """The embedding rows a new model gets for ``tokenizer``: ``--vocab_size`` when given, else the tokenizer's size
    rounded up to a multiple of 64 (matrix shapes that tile well on accelerators; the spare rows are never used).

    A ``--vocab_size`` smaller than the tokenizer (``--tokenizer`` ``spec``) raises `LMKitError` naming both flags.
    """
    rows = vocab_size or VOCAB_MULTIPLE * math.ceil(len(tokenizer) / VOCAB_MULTIPLE)
    if len(tokenizer) > rows:
        raise LMKitError(f"--tokenizer {spec} has {len(tokenizer)} tokens, more than the model's --vocab_size {rows}")
    return rows


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A GPT-2 style byte-level BPE (no prefix space, so decoding is lossless) trained on ``texts``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_batches(texts), trainer=trainer)
    return backend


def _char(texts: Iterable[str]) -> Tokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise LMKitError("--tokenizer char: the training texts are empty")
    # Characters first, in sorted order, so their ids match nanoGPT's shakespeare-char meta.pkl; specials after.
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    for special in (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN):
        vocab[special] = len(vocab)
    # A BPE without merges is a character lookup; no pre-tokenizer, so spaces and newlines are characters too.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    return backend


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _load(spec: str, *, trust_remote_code: bool, cache_dir: str | None) -> PreTrainedTokenizerFast:
    path = local_path(spec)
    if path is not None and not path.exists():
        raise LMKitError(f"--tokenizer {spec}: no such file or directory (and not a hub id)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec if path is None else str(path),
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
        )
    except (OSError, ValueError) as err:  # missing repo/files, or no tokenizer in that folder
        raise LMKitError(f"--tokenizer {spec}: could not load a tokenizer ({type(err).__name__}: {err})") from err
    return _ensure_specials(tokenizer, spec)


def _ensure_specials(tokenizer: PreTrainedTokenizerFast, spec: str) -> PreTrainedTokenizerFast:
    added = []
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        added.append(f"eos={EOS_TOKEN}")
    if tokenizer.bos_token is None:  # GPT-2 convention: one boundary token
        tokenizer.bos_token = tokenizer.eos_token
        added.append(f"bos={tokenizer.eos_token}")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(f"pad={PAD_TOKEN}")
    if added:
        logger.info("Tokenizer %s: set %s (vocabulary now %d)", spec, ", ".join(added), len(tokenizer))
    return tokenizer
