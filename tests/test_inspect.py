"""lmkit.inspect renders literal collated batches exactly; recipes/inspect_data.py shows each recipe's rows as its
collator makes them (the JSON's trained mask is the collator's labels != -100) and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _recipes import load_recipe
from _tiny_checkpoint import make_checkpoint

from lmkit.args import DataArguments
from lmkit.collator import CausalLMCollator
from lmkit.data import build_lm_datasets, load_raw_datasets
from lmkit.dpo import PreferenceCollator, tokenize_pair
from lmkit.finetune import load_tokenizer
from lmkit.finetune_args import FinetuneArguments
from lmkit.inspect import LEGEND, escape, pair_views, render_pairs, render_rows, row_views, summary, table
from lmkit.packing import pack_examples
from lmkit.sft import tokenize_example
from lmkit.tokenizer import build_tokenizer

X = -100
CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "configs"


class Tok:
    """Just what lmkit.inspect uses of a tokenizer: decode, pad and EOS ids."""

    VOCAB = ["<pad>", "</s>", "<s>", "Q", ":", " ", "hi", "\n", "A", "ok"]
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.VOCAB[i] for i in ids)


def test_escape_makes_whitespace_visible():
    assert escape("a b\n\tc\\d\x00") == "a␣b\\n\\tc\\\\d\\x00"


def test_pretraining_block():
    # "hi hi</s>Q:" cut across two documents: every target is trained, the EOS ends the first document.
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [6, 5, 6, 1, 3, 4]}])
    assert (
        render_rows(row_views(batch, Tok())) == f"{LEGEND}\n\nrow 0: 5 tokens, 5 trained, 2 documents\n⟦hi⟧␣hi</s>¦Q:"
    )


def test_sft_prompt_completion_rows_mask_the_prompt_and_show_padding():
    rows = [
        {"input_ids": [2, 3, 4, 7, 8, 4, 9, 1], "labels": [X, X, X, X, 8, 4, 9, 1]},  # <s>Q:\n | A:ok</s>
        {"input_ids": [2, 3, 8, 1], "labels": [X, X, 8, 1]},  # <s>Q | A</s>, padded to the first row's width
    ]
    batch = CausalLMCollator(pad_token_id=0)(rows)
    assert render_rows(row_views(batch, Tok())) == (
        f"{LEGEND}\n\n"
        "row 0: 7 tokens, 4 trained, 1 document\n⟦<s>Q:\\n⟧A:ok</s>\n\n"
        "row 1: 3 tokens, 2 trained, 1 document, 4 padding\n⟦<s>Q⟧A</s>⟨pad×4⟩"
    )


def test_an_eos_inside_an_sft_row_does_not_start_a_document():
    # A chat template that ends a turn with EOS (as Qwen's <|im_end|> is): one example, one document.
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [3, 8, 1, 3, 9, 1], "labels": [X, 8, 1, X, 9, 1]}])
    assert summary(row_views(batch, Tok(), eos_separates=False)[0]) == "5 tokens, 4 trained, 1 document"
    assert summary(row_views(batch, Tok())[0]) == "5 tokens, 4 trained, 2 documents"


PACKED = [{"input_ids": [2, 3, 8, 1], "labels": [X, X, 8, 1]}, {"input_ids": [2, 3, 9, 1], "labels": [X, X, 9, 1]}]


def test_packed_sft_row_two_documents_position_reset():
    batch = CausalLMCollator(pad_token_id=0)(list(pack_examples(PACKED, 10, pad_token_id=0)))
    view = row_views(batch, Tok())[0]
    assert render_rows([view]) == (
        f"{LEGEND}\n\nrow 0: 8 tokens, 4 trained, 2 documents, 1 padding\n⟦<s>Q⟧A</s>¦⟦<s>Q⟧ok</s>⟨pad×1⟩"
    )
    assert table(view) == "\n".join(
        [
            "    i   pos   in_id  input  tgt_id  target trained",
            "    0     0       2  <s>      -100        -",
            "    1     1       3  Q           8  A     yes",
            "    2     2       8  A           1  </s>  yes",
            "    3     3       1  </s>     -100        -",
            "    4     0       2  <s>      -100        -   ¦ document start",
            "    5     1       3  Q           9  ok    yes",
            "    6     2       9  ok          1  </s>  yes",
            "    7     3       1  </s>     -100        -",
            "    8     0       0  <pad>    -100        pad",
        ]
    )
    assert json.loads(render_rows([view], "json")) == {
        "row": 0,
        "input_ids": [2, 3, 8, 1, 2, 3, 9, 1, 0],
        "targets": [X, 8, 1, X, X, 9, 1, X, X],
        "trained": [False, True, True, False, False, True, True, False, False],
        "position_ids": [0, 1, 2, 3, 0, 1, 2, 3, 0],
        "padding": [False] * 8 + [True],
        "tokens": ["<s>", "Q", "A", "</s>", "<s>", "Q", "ok", "</s>", "<pad>"],
        "target_tokens": [None, "A", "</s>", None, None, "ok", "</s>", None, None],
        "n_tokens": 8,
        "n_trained": 4,
        "n_documents": 2,
    }


PAIR = {
    "chosen_input_ids": [2, 3, 4, 9, 1],  # <s>Q: | ok</s>
    "chosen_labels": [X, X, X, 9, 1],
    "rejected_input_ids": [2, 3, 4, 8, 5, 8, 1],  # <s>Q: | A A</s>
    "rejected_labels": [X, X, X, 8, 5, 8, 1],
}


@pytest.mark.parametrize("packing", [False, True])
def test_preference_pair_prompt_chosen_rejected(packing):
    batch = PreferenceCollator(pad_token_id=0, packing=packing)([PAIR])
    padding = "" if packing else ", 2 padding"
    assert render_pairs(pair_views(batch, Tok())) == (
        f"{LEGEND}\n\n"
        f"pair 0: chosen 4 tokens, 2 trained, 1 document{padding}; rejected 6 tokens, 4 trained, 1 document\n"
        "  prompt:   <s>Q:\n"
        f"  chosen:   ok</s>{'' if packing else '⟨pad×2⟩'}\n"
        "  rejected: A␣A</s>"
    )


# ---------------------------------------------------------------------------------------------------------------
# The recipe, end to end
# ---------------------------------------------------------------------------------------------------------------

TEXT = "hello there\nfriend\n\nthe second one\nruns longer here\n\nand a third\n"


def _inspect(argv: list[str], capsys) -> list[dict]:
    text = load_recipe("inspect_data").main([*argv, "--format", "json"])
    assert capsys.readouterr().out == text + "\n"  # stdout holds the rows alone; the logs go to stderr
    return [json.loads(line) for line in text.splitlines()]


def _assert_matches_collator(row: dict, batch: dict, i: int, labels: str = "labels") -> None:
    assert row["input_ids"] == batch["input_ids"][i].tolist()
    assert row["targets"] == batch[labels][i].tolist()
    assert row["trained"] == (batch[labels][i] != X).tolist()


def test_recipe_pretraining_blocks(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "val.txt").write_text(TEXT)
    out = tmp_path / "out"
    flags = ["--train_files", str(tmp_path / "train.txt"), "--validation_files", str(tmp_path / "val.txt"),
             "--tokenizer", "char", "--block_size", "8", "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    rows = _inspect(["--config", str(CONFIGS / "tiny.yaml"), *flags, "--rows", "3", "--output_dir", str(out)], capsys)
    # The same blocks, built here step by step: char tokenizer, documents joined by EOS, blocks of 9 tokens.
    data_args = DataArguments(train_files=[str(tmp_path / "train.txt")], validation_files=[str(tmp_path / "val.txt")],
                              tokenizer="char", block_size=8, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    raw = load_raw_datasets(data_args, seed=42)
    tokenizer = build_tokenizer("char", (r["text"] for r in raw["train"]), None)
    blocks = build_lm_datasets(raw, tokenizer, data_args)["train"]
    batch = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)([blocks[i] for i in range(3)])
    assert len(rows) == 3
    for i, row in enumerate(rows):
        _assert_matches_collator(row, batch, i)
    assert rows[0]["tokens"][:5] == list("hello") and all(rows[0]["trained"])
    # "hello there\nfriend</s>" is 19 tokens: its EOS opens row 2, whose second input starts the next document.
    assert [r["n_documents"] for r in rows] == [1, 1, 2] and rows[2]["tokens"][:2] == ["<|endoftext|>", "t"]
    assert not out.exists()


def test_recipe_mixture_validation_rows_come_source_by_source(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("aaaa aaaa aaaa\n\n" * 8)
    (tmp_path / "b.txt").write_text("bbbb bbbb bbbb\n\n" * 8)
    sources = [{"name": n, "files": str(tmp_path / f"{n}.txt"), "weight": 1} for n in ("a", "b")]
    rows = _inspect(["--datasets", json.dumps(sources), "--tokenizer", "char", "--block_size", "8",
                     "--validation_split", "0.25", "--split", "validation", "--rows", "9", "--cache_dir",
                     str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")], capsys)  # fmt: skip
    # 2 of 8 documents held out per source: 2 x 15 tokens = 3 blocks of 9 from each source, "a" first.
    letters = ["".join(t for t in r["tokens"] if t in "ab") for r in rows]
    assert [s[0] for s in letters] == ["a", "a", "a", "b", "b", "b"] and all(len(set(s)) == 1 for s in letters)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "ckpt"
    make_checkpoint(path, run_files=False)
    return path


def test_recipe_packed_sft_rows(tmp_path, checkpoint, capsys):
    examples = [{"prompt": "Q: hi\n", "completion": "A: yes"}, {"prompt": "Q: no\n", "completion": "A: ok then"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    out = tmp_path / "out"
    rows = _inspect(["--config", str(CONFIGS / "sft-full.yaml"), "--model_name_or_path", str(checkpoint),
                     "--train_files", str(tmp_path / "sft.jsonl"), "--validation_split", "0", "--packing", "true",
                     "--block_size", "40", "--rows", "1", "--output_dir", str(out)], capsys)  # fmt: skip
    tokenizer, _ = load_tokenizer(str(checkpoint))
    packed = list(pack_examples([tokenize_example(e, tokenizer) for e in examples], 41, tokenizer.pad_token_id))
    batch = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)(packed[:1])
    assert len(rows) == 1
    _assert_matches_collator(rows[0], batch, 0)
    assert rows[0]["position_ids"] == batch["position_ids"][0].tolist()
    assert rows[0]["n_documents"] == 2 and rows[0]["position_ids"].count(0) == 3  # two examples and the padding
    assert not out.exists()


def test_recipe_preference_pairs(tmp_path, checkpoint, capsys):
    pairs = [{"prompt": "Q: hi\n", "chosen": "A: yes", "rejected": "A: no way"},
             {"prompt": "Q: so\n", "chosen": "A: fine", "rejected": "A: bad"}]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "out"
    rows = _inspect(["--config", str(CONFIGS / "dpo.yaml"), "--model_name_or_path", str(checkpoint), "--train_files",
                     str(tmp_path / "pairs.jsonl"), "--validation_split", "0", "--rows", "2", "--cache_dir",
                     str(tmp_path / "cache"), "--output_dir", str(out)], capsys)  # fmt: skip
    tokenizer, _ = load_tokenizer(str(checkpoint))
    collate = PreferenceCollator.from_args(tokenizer.pad_token_id, FinetuneArguments())
    batch = collate([tokenize_pair(p, tokenizer, 64) for p in pairs])  # the recipe's default padding
    assert [r["pair"] for r in rows] == [0, 1]
    for k, row in enumerate(rows):
        _assert_matches_collator(row["chosen"], batch, k, "targets")
        _assert_matches_collator(row["rejected"], batch, 2 + k, "targets")
    assert not out.exists()


def test_recipe_is_told_from_the_flags_and_config():
    which = load_recipe("inspect_data").which_recipe
    assert which(["--config", str(CONFIGS / "tiny.yaml")]) == "pretrain"
    assert which(["--config", str(CONFIGS / "sft-full.yaml")]) == "finetune"
    assert which(["--model_name_or_path", "m"]) == "finetune"
    assert which(["--config", str(CONFIGS / "dpo.yaml")]) == "dpo"
    assert which(["--model_name_or_path", "m", "--beta", "0.2"]) == "dpo"
    assert which(["--recipe", "pretrain", "--model_name_or_path", "m"]) == "pretrain"
    assert which(["--model_name_or_path", "m", "--recipe=dpo"]) == "dpo"


def test_recipe_finetune_and_dpo_mixtures_show_rows_in_the_mixed_order(tmp_path, checkpoint, capsys):
    from lmkit.mixture import source_choices

    number = "cdefgh"  # the tiny checkpoint's characters hold no digits
    for name in ("a", "b"):  # prompts name their source and number: "ac:" (a's first), "bf:" (b's fourth)
        sft = [{"prompt": f"{name}{number[i]}:", "completion": "x"} for i in range(6)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in sft))
        pairs = [{"prompt": f"{name}{number[i]}:", "chosen": "x", "rejected": "y"} for i in range(6)]
        (tmp_path / f"{name}-pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    order = source_choices([1, 1], 3, 0, 6)  # --seed 3
    taken = {0: 0, 1: 0}
    expected = []
    for s in order:
        expected.append(f"{'ab'[s]}{number[taken[s]]}:")
        taken[s] += 1
    common = ["--model_name_or_path", str(checkpoint), "--validation_split", "0", "--seed", "3", "--cache_dir",
              str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]  # fmt: skip

    def mix(suffix: str) -> str:
        return json.dumps([{"name": n, "files": str(tmp_path / f"{n}{suffix}.jsonl"), "weight": 1} for n in "ab"])

    rows = _inspect(["--config", str(CONFIGS / "sft-full.yaml"), "--datasets", mix(""), "--rows", "6", *common],
                    capsys)  # fmt: skip
    assert ["".join(r["tokens"]).split(":")[0].split(">")[-1] + ":" for r in rows] == expected
    pairs = _inspect(["--config", str(CONFIGS / "dpo.yaml"), "--datasets", mix("-pairs"), "--rows", "6", *common],
                     capsys)  # fmt: skip
    assert ["".join(p["chosen"]["tokens"]).split(":")[0].split(">")[-1] + ":" for p in pairs] == expected
    assert not (tmp_path / "out").exists()


def test_recipe_pretraining_rows_of_a_tokenized_dataset(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TEXT * 4)
    flags = ["--train_files", str(tmp_path / "train.txt"), "--tokenizer", "char", "--block_size", "8",
             "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    load_recipe("preprocess").main([*flags, "--output_dir", str(tmp_path / "tok")])
    capsys.readouterr()  # preprocess's own line
    rows = _inspect(["--config", str(CONFIGS / "tiny.yaml"), "--tokenized_dataset", str(tmp_path / "tok"),
                     "--rows", "2", "--output_dir", str(tmp_path / "out")], capsys)  # fmt: skip
    import datasets

    blocks = datasets.load_from_disk(str(tmp_path / "tok"))["train"]
    assert [r["input_ids"] + [r["targets"][-1]] for r in rows] == [blocks[0]["input_ids"], blocks[1]["input_ids"]]
    assert not (tmp_path / "out").exists()
