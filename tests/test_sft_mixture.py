"""SFT mixtures (``--datasets`` of prompt/completion and chat files): rows per source by weight, per-source eval,
the same rows as ``--train_files`` for one source, streamed mixtures replayed exactly, bad mixtures refused; and
the same for preference pairs (recipes/dpo.py).

Source "rev" asks to reverse a word, source "rot" to rotate one: a decoded row shows which source it came from.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import pytest
from test_dpo import base  # noqa: F401 (base: the tiny checkpoint fixture of the DPO tests)
from test_dpo import run as dpo_run
from test_finetune import lmkit_base, run  # noqa: F401 (lmkit_base: the tiny lmkit checkpoint fixture)
from test_sft import tok  # noqa: F401 (tok: the char tokenizer fixture with ChatML markers)
from test_streaming_resume import StopAfter, losses, make_trainer
from transformers import AutoTokenizer

from lmkit.args import DataArguments
from lmkit.checkpoint import STREAM_POSITION, ResumableData
from lmkit.errors import LMKitError
from lmkit.mixture import StreamMix
from lmkit.sft import SFTStream, build_sft_datasets, sft_format

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared


def words(letters: str, n: int) -> list[str]:
    return ["".join(w) for w in itertools.islice(itertools.product(letters, repeat=3), n)]


def rev_rows(n: int) -> list[dict]:
    return [{"prompt": f"rev {w}\n", "completion": w[::-1]} for w in words("abcdefg", n)]


def rot_rows(n: int) -> list[dict]:
    return [{"prompt": f"rot {w}\n", "completion": w[1:] + w[0]} for w in words("hijklmn", n)]


def chat_rows(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"rot {w}"}, {"role": "assistant", "content": w[1:] + w[0]}]}
        for w in words("hijklmn", n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sources(tmp_path: Path, rev: int = 300, rot: int = 150, weights=(0.75, 0.25), rot_as=rot_rows) -> str:
    """``--datasets`` (one JSON string) of a "rev" and a "rot" source with ``rev`` / ``rot`` rows."""
    entries = [
        {"name": "rev", "files": str(write_jsonl(tmp_path / "rev.jsonl", rev_rows(rev))), "weight": weights[0]},
        {"name": "rot", "files": str(write_jsonl(tmp_path / "rot.jsonl", rot_as(rot))), "weight": weights[1]},
    ]
    return json.dumps(entries)


def data_args(tmp_path: Path, datasets: str | None = None, **overrides) -> DataArguments:
    fields = dict(block_size=32, validation_split=0.0, cache_dir=str(tmp_path / "cache"))
    return DataArguments(datasets=[datasets or sources(tmp_path)], **{**fields, **overrides})


def source_of(tokenizer, row: dict) -> str:
    return tokenizer.decode(row["input_ids"])[:3]


# -- in memory: the realized mix ------------------------------------------------------------------------------


def test_rows_per_source_follow_the_weights_each_source_in_file_order(tok, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="lmkit.mixture"):
        splits = build_sft_datasets(data_args(tmp_path), tok, seed=0)
    assert splits["validation"] is None  # --validation_split 0
    mixed = splits["train"].to_list()
    assert [source_of(tok, r) for r in mixed[:8]] == ["rot", "rev", "rev", "rev", "rot", "rev", "rot", "rev"]
    texts = {name: [tok.decode(r["input_ids"]) for r in mixed if source_of(tok, r) == name] for name in ("rev", "rot")}
    # first_exhausted: "rev" (weight 0.75) runs out after its 300 rows, with 101 of "rot"'s 150 taken
    assert len(mixed) == 401 and {name: len(rows) for name, rows in texts.items()} == {"rev": 300, "rot": 101}
    assert texts["rot"][:2] == ["rot hhh\nhhh<|endoftext|>", "rot hhi\nhih<|endoftext|>"]  # in file order
    assert texts["rev"][-1] == "rev gaf\nfag<|endoftext|>"  # the file's 300th and last row
    assert caplog.messages[-1] == (  # 4 target tokens a row: the 3-letter answer and EOS
        "Mixture of 2 sources: rev 300 rows (74.8%, weight 75.0%; 1,200 target tokens, 74.8%); "
        "rot 101 rows (25.2%, weight 25.0%; 404 target tokens, 25.2%)"
    )


def test_packing_fills_each_row_from_one_source_before_mixing(tok, tmp_path):  # noqa: F811
    mixed = build_sft_datasets(data_args(tmp_path), tok, packing=True, seed=0)["train"].to_list()
    # 12-token examples, 2 to a row of 33: 150 "rev" rows and 75 "rot" rows, mixed 3:1 until "rev" runs out
    assert len(mixed) == 202 and all(len(r["input_ids"]) == 33 for r in mixed)
    texts = [tok.decode(r["input_ids"], skip_special_tokens=True) for r in mixed]
    assert texts[:2] == ["rot hhh\nhhhrot hhi\nhih", "rev aaa\naaarev aab\nbaa"]
    assert sum(t.startswith("rot") for t in texts) == 52 and all(t.count(t[:4]) == 2 for t in texts)


def test_one_source_is_the_train_files_run(tok, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "rev.jsonl", rev_rows(40))
    one = json.dumps([{"name": "rev", "files": str(data), "weight": 3}])
    for streaming in (False, True):
        common = dict(block_size=32, validation_split=0.1, cache_dir=str(tmp_path / "cache"), streaming=streaming)
        mixture = build_sft_datasets(DataArguments(datasets=[one], **common), tok, seed=1)
        plain = build_sft_datasets(DataArguments(train_files=[str(data)], **common), tok, seed=1)
        assert list(mixture["train"]) == list(plain["train"]) and len(list(plain["train"])) == 36  # 4 held out
        assert mixture["validation"].to_list() == plain["validation"].to_list()


# -- streaming: the same mix, replayed exactly ----------------------------------------------------------------------


def test_streamed_mixture_is_the_in_memory_mix_on_every_pass(tok, tmp_path):  # noqa: F811
    in_memory = build_sft_datasets(data_args(tmp_path), tok, seed=0)["train"].to_list()
    stream = build_sft_datasets(data_args(tmp_path, streaming=True), tok, seed=0)["train"]
    assert isinstance(stream, StreamMix) and all(isinstance(s, SFTStream) for s in stream.streams.values())
    assert not isinstance(stream, ResumableData)  # its sources keep no position: a resumed run replays it
    first, second = list(stream), list(stream)
    assert first == second == in_memory


def test_streamed_mixture_resumes_exactly_by_replay(tok, tmp_path, caplog):  # noqa: F811
    def train_rows():
        args = data_args(tmp_path, block_size=16, streaming=True)
        return build_sft_datasets(args, tok, packing=True, seed=0)["train"]

    ref = make_trainer(tmp_path / "ref", train_rows(), tok, max_steps=8, save_strategy="no")
    ref.train()
    run_dir = tmp_path / "run"
    make_trainer(run_dir, train_rows(), tok, [StopAfter(4)], max_steps=8, save_steps=4).train()
    assert not (run_dir / "checkpoint-4" / STREAM_POSITION).exists()
    resumed = make_trainer(run_dir, train_rows(), tok, max_steps=8, save_steps=4)
    with caplog.at_level(logging.WARNING, logger="lmkit.checkpoint"):
        resumed.train(resume_from_checkpoint=str(run_dir / "checkpoint-4"))
    assert any("replaying the stream batch by batch up to step 4" in m for m in caplog.messages)
    assert len(losses(ref)) == 8 and losses(resumed) == losses(ref)


# -- recipes/finetune.py --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_finetune_mixes_chat_and_prompt_completion_and_reports_each_source(lmkit_base, tmp_path, streaming):  # noqa: F811
    datasets = sources(tmp_path, rev=60, rot=60, weights=(1, 1), rot_as=chat_rows)
    metrics = run(
        "--model_name_or_path", lmkit_base, "--datasets", datasets, "--output_dir", tmp_path / "out",
        "--block_size", 48, "--validation_split", 0.1, "--max_steps", 2, "--per_device_train_batch_size", 4,
        "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "no", "--streaming", streaming,
    )  # fmt: skip
    rev, rot = metrics["eval_rev_loss"], metrics["eval_rot_loss"]
    assert rev != rot and math.isfinite(metrics["train_loss"])
    # The overall loss weights each source by its trained targets (test_trainer.py checks the rule exactly)
    assert min(rev, rot) < metrics["eval_loss"] < max(rev, rot)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 32  # the chat source's template markers were added


def test_finetune_text_sources_continue_pretraining_as_a_mixture(lmkit_base, tmp_path):  # noqa: F811
    entries = []
    for name, letters in (("books", "abcdefg"), ("notes", "hijklmn")):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n\n".join(f"the {w} is a word" for w in words(letters, 120)))
        entries.append({"name": name, "files": str(path), "weight": 0.5})
    metrics = run(
        "--model_name_or_path", lmkit_base, "--datasets", json.dumps(entries), "--output_dir", tmp_path / "out",
        "--block_size", 32, "--max_steps", 2, "--per_device_train_batch_size", 4, "--eval_strategy", "steps",
        "--eval_steps", 2, "--save_strategy", "no",
    )  # fmt: skip
    assert {"eval_loss", "eval_books_loss", "eval_notes_loss"} <= set(metrics)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == 2 * 4 * 32  # packed blocks, as in pretraining


# -- bad input ------------------------------------------------------------------------------------------------------


def test_raw_text_or_a_hub_dataset_beside_sft_sources_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("some text\n")
    sft = {"name": "rev", "files": str(write_jsonl(tmp_path / "rev.jsonl", rev_rows(3)))}
    text = {"name": "notes", "files": str(tmp_path / "notes.txt")}
    with pytest.raises(LMKitError) as err:
        sft_format(DataArguments(datasets=[json.dumps([sft, text])]))
    assert str(err.value) == (
        "--datasets notes.files: raw text (no prompt/completion or messages rows), which cannot be mixed with the "
        "prompt/completion or chat sources (rev); continue pretraining on text sources in a run of their own"
    )
    hub = {"name": "web", "dataset_name": "some/dataset"}
    with pytest.raises(LMKitError) as err:
        sft_format(DataArguments(datasets=[json.dumps([hub, sft])]))
    assert str(err.value) == (
        "--datasets web.dataset_name some/dataset: a hub dataset is read as raw text, which cannot be mixed with the "
        "prompt/completion or chat sources (rev); give its examples as JSON-lines files"
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_a_bad_row_names_its_source(tok, tmp_path, streaming):  # noqa: F811
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rot_rows(2), {"prompt": "x"}])
    entries = [{"name": "rev", "files": str(write_jsonl(tmp_path / "rev.jsonl", rev_rows(20)))},
               {"name": "rot", "files": str(bad)}]  # fmt: skip
    with pytest.raises(LMKitError) as err:
        splits = build_sft_datasets(data_args(tmp_path, json.dumps(entries), streaming=streaming), tok)
        list(splits["train"])
    assert str(err.value) == (
        f"--datasets rot.files {bad}:3: no 'completion' field (every row needs 'prompt' and 'completion', as the "
        "first row has)"
    )


def test_finetune_refuses_text_beside_sft_in_one_line(lmkit_base, tmp_path, capsys):  # noqa: F811
    (tmp_path / "notes.txt").write_text("some text\n")
    entries = [{"name": "rev", "files": str(write_jsonl(tmp_path / "rev.jsonl", rev_rows(3)))},
               {"name": "notes", "files": str(tmp_path / "notes.txt")}]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run("--model_name_or_path", lmkit_base, "--datasets", json.dumps(entries), "--output_dir", tmp_path / "out")
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("lmkit: error: --datasets notes.files: raw text (no prompt/completion or messages")
    assert not (tmp_path / "out").exists()


# -- recipes/dpo.py: preference sources ----------------------------------------------------------------------------


def test_dpo_mixes_preference_sources_by_weight_and_reports_each(base, tmp_path, caplog):  # noqa: F811
    distinct = ["".join(w) for w in itertools.islice(itertools.permutations("abcdefg", 3), 40)]  # chosen != rejected
    rev = [{"prompt": f"rev {w}\n", "chosen": w[::-1], "rejected": w} for w in distinct]
    rot = [  # conversational pairs beside string pairs: both tokenize to the same columns
        {"prompt": [{"role": "user", "content": f"rot {w}"}], "chosen": [{"role": "assistant", "content": w[1:] + w[0]}],
         "rejected": [{"role": "assistant", "content": w}]}
        for w in distinct
    ]  # fmt: skip
    entries = [{"name": "rev", "files": str(write_jsonl(tmp_path / "rev.jsonl", rev)), "weight": 0.75},
               {"name": "rot", "files": str(write_jsonl(tmp_path / "rot.jsonl", rot)), "weight": 0.25}]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lmkit"):
        metrics = dpo_run(
            "--model_name_or_path", base, "--datasets", json.dumps(entries), "--output_dir", tmp_path / "out",
            "--cache_dir", tmp_path / "cache", "--validation_split", 0.1, "--max_length", 48, "--max_steps", 2,
            "--per_device_train_batch_size", 4, "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "no",
        )  # fmt: skip
    # 36 train pairs each: "rev" runs out first, after its 36 pairs with 16 of "rot" (52 pairs: part of one
    # shuffled chunk of 100, which holds 75 + 25, so a short mixture is only near the weights)
    assert "Mixture of 2 sources: rev 36 pairs (69.2%, weight 75.0%); rot 16 pairs (30.8%, weight 25.0%)" in (
        caplog.messages
    )
    rev_loss, rot_loss = metrics["eval_rev_loss"], metrics["eval_rot_loss"]
    assert metrics["eval_loss"] == pytest.approx((rev_loss * 4 + rot_loss * 4) / 8, abs=1e-12)  # 4 held out of each
