"""Tokenizers: trained byte-level BPE, character level, and loading from a folder."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lmkit.errors import LMKitError
from lmkit.tokenizer import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "lmkit" / "corpus" / "tinyshakespeare.txt"

ROUND_TRIP = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces, trailing spaces  \n\n\nthree newlines\ttab\r\nCRLF",
    "unicode: héllo wörld, ünïcödé, 日本語, emoji 🎉👍🏽, math ∑∫",
    "",
    "\n",
]


@pytest.fixture(scope="module")
def shakespeare() -> list[str]:
    return [doc for doc in CORPUS.read_text(encoding="utf-8").split("\n\n") if doc]


@pytest.fixture(scope="module")
def bpe(shakespeare) -> PreTrainedTokenizerFast:
    return build_tokenizer("train", shakespeare, vocab_size=1024)


def test_bpe_has_requested_vocab_and_distinct_specials(bpe):
    assert isinstance(bpe, PreTrainedTokenizerFast)
    assert len(bpe) == 1024
    assert bpe.eos_token == bpe.bos_token == EOS_TOKEN
    assert bpe.pad_token == PAD_TOKEN
    assert bpe.pad_token_id != bpe.eos_token_id
    assert {bpe.eos_token_id, bpe.pad_token_id} == {0, 1}  # specials first in a trained BPE


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trips_exactly(bpe, text):
    ids = bpe(text)["input_ids"]
    assert bpe.eos_token_id not in ids  # no specials added on encode: the data pipeline places EOS itself
    assert bpe.decode(ids) == text


def test_bpe_trains_on_the_bundled_corpus_with_default_size(shakespeare):
    tokenizer = build_tokenizer("train", shakespeare, vocab_size=None)
    assert len(tokenizer) == 8192
    text = "\n\n".join(shakespeare[:50])
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 3  # it learned real merges


def test_char_vocab_is_sorted_characters_then_specials():
    tokenizer = build_tokenizer("char", ["ba\n", "cé"], vocab_size=None)
    assert tokenizer.get_vocab() == {
        "\n": 0,
        "a": 1,
        "b": 2,
        "c": 3,
        "é": 4,
        EOS_TOKEN: 5,
        PAD_TOKEN: 6,
        UNK_TOKEN: 7,
    }
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (5, 5, 6)
    assert tokenizer("abc\né")["input_ids"] == [1, 2, 3, 0, 4]
    assert tokenizer("aXb")["input_ids"] == [1, 7, 2]  # unseen character -> <|unk|>


def test_char_matches_nanogpt_shakespeare_vocab(shakespeare):
    text = CORPUS.read_text(encoding="utf-8")
    tokenizer = build_tokenizer("char", [text], vocab_size=None)
    chars = sorted(set(text))
    assert len(chars) == 65
    assert len(tokenizer) == 65 + 3
    assert [tokenizer.convert_tokens_to_ids(c) for c in chars] == list(range(65))  # nanoGPT's stoi
    sample = "\n\n".join(shakespeare[:20])
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


@pytest.mark.parametrize("text", [t for t in ROUND_TRIP if t])
def test_char_round_trips_exactly(text):
    tokenizer = build_tokenizer("char", ROUND_TRIP, vocab_size=None)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("spec", ["train", "char"])
def test_save_and_reload_keeps_ids_and_specials(tmp_path, spec, shakespeare):
    tokenizer = build_tokenizer(spec, shakespeare[:200], vocab_size=512)
    tokenizer.save_pretrained(tmp_path)
    reloaded = build_tokenizer(str(tmp_path))
    text = ROUND_TRIP[0]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert (reloaded.eos_token, reloaded.bos_token, reloaded.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert len(reloaded) == len(tokenizer)


def test_loaded_tokenizer_without_pad_gets_a_distinct_pad(tmp_path):
    backend = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>").save_pretrained(tmp_path)
    tokenizer = build_tokenizer(str(tmp_path))
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.bos_token == "</s>"
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id == 3


def test_missing_path_names_the_flag(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(LMKitError, match=r"--tokenizer .*no_such_tokenizer.*no such file"):
        build_tokenizer(str(missing))


def test_folder_without_tokenizer_names_the_flag(tmp_path):
    with pytest.raises(LMKitError, match=r"--tokenizer .*could not load"):
        build_tokenizer(str(tmp_path))


@pytest.mark.parametrize("spec", ["train", "char"])
def test_building_needs_texts(spec):
    with pytest.raises(LMKitError, match=f"--tokenizer {spec}"):
        build_tokenizer(spec, None, vocab_size=None)


def test_model_vocab_size_rounds_up_to_64_and_refuses_a_smaller_vocab_size():
    from lmkit.tokenizer import model_vocab_size

    hundred = build_tokenizer("char", ["".join(chr(0x4E00 + i) for i in range(97))])  # 97 characters, eos, pad, unk
    assert len(hundred) == 100
    assert model_vocab_size(hundred, None, "char") == 128
    assert model_vocab_size(hundred, 100, "char") == 100  # --vocab_size as given: no rounding
    exactly = build_tokenizer("char", ["".join(chr(0x4E00 + i) for i in range(125))])
    assert len(exactly) == 128 and model_vocab_size(exactly, None, "char") == 128
    with pytest.raises(LMKitError, match=r"^--tokenizer char has 100 tokens, more than the model's --vocab_size 64$"):
        model_vocab_size(hundred, 64, "char")
