"""Evaluation: same loss as the trainer's eval, exact sliding window, bits per byte, recipe and bad input."""

import json
import math
import subprocess
import sys

import evaluate
import pytest
import torch
import torch.nn.functional as F
from _recipes import load_recipe
from _tiny_checkpoint import REPO, TEXT, make_checkpoint

from lmkit.args import DataArguments, LMTrainingArguments
from lmkit.collator import CausalLMCollator
from lmkit.data import build_lm_datasets, load_raw_datasets
from lmkit.evaluation import METRIC_PATH, evaluate_stream, sliding_windows, token_stream
from lmkit.trainer import LMTrainer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model, tok = make_checkpoint(path)
    heldout = path.parent / "heldout.txt"
    heldout.write_text(TEXT[1500:3000], encoding="utf-8")
    return path, model, tok, heldout


def test_blocks_are_the_training_blocks_and_loss_equals_trainer_eval_loss(ckpt, tmp_path):
    path, model, tok, heldout = ckpt
    data_args = DataArguments(
        train_files=[str(heldout)], validation_files=[str(heldout)], block_size=16, cache_dir=str(tmp_path / "cache")
    )
    raw = load_raw_datasets(data_args, seed=0)
    blocks = build_lm_datasets(raw, tok, data_args)["validation"]
    stream = token_stream(raw["validation"]["text"], tok)
    assert [stream.ids[i * 17 : (i + 1) * 17] for i in range(len(blocks))] == blocks["input_ids"]

    args = LMTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_eval_batch_size=3,
        disable_tqdm=True,
        bf16=False,
    )  # batch 3 leaves a short last batch: the trainer weights batches by size, equal to the token mean here
    trainer = LMTrainer(model=model, args=args, eval_dataset=blocks, data_collator=CausalLMCollator(tok.pad_token_id))
    eval_loss = trainer.evaluate()["eval_loss"]
    ours = evaluate_stream(model, tok, stream, context=16, batch_size=5)
    assert ours["tokens"] == 16 * len(blocks) and ours["windows"] == len(blocks)
    assert ours["loss"] == pytest.approx(eval_loss, rel=1e-6)
    assert ours["perplexity"] == pytest.approx(math.exp(eval_loss), rel=1e-6)


def test_sliding_window_scores_every_token_once_with_its_window_as_context(ckpt):
    _, model, tok, _ = ckpt
    stream = token_stream([TEXT[:30], TEXT[200:225]], tok)  # 57 tokens
    context, stride = 8, 3
    windows = sliding_windows(len(stream), context, stride)
    scored = [j for w in windows for j in range(w.first_scored, w.end)]
    assert scored == list(range(1, len(stream)))  # each target exactly once, in order
    assert all(j - w.start >= context - stride for w in windows[1:] for j in range(w.first_scored, w.end))

    by_hand = 0.0  # one forward per target, on exactly the tokens of its window before it
    with torch.no_grad():
        for w in windows:
            for j in range(w.first_scored, w.end):
                logits = model(torch.tensor([stream.ids[w.start : j]])).logits[0, -1]
                by_hand -= F.log_softmax(logits.float(), -1)[stream.ids[j]].item()
    results = evaluate_stream(model, tok, stream, context=context, stride=stride, batch_size=4)
    assert results["tokens"] == len(stream) - 1
    assert results["loss"] * results["tokens"] == pytest.approx(by_hand, rel=1e-5)


def test_bits_per_byte_counts_utf8_bytes_exactly(ckpt, tmp_path):
    _, model, _, _ = ckpt
    docs = ["Café — naïve señor, ½ déjà vu.", "Æsop's fables: ünïcödé 🙂 test"]
    for kind in ("train", "char"):  # byte-level BPE and character tokenizers
        _, tok = make_checkpoint(tmp_path / kind, tokenizer=kind, run_files=False)
        stream = token_stream(docs, tok)
        assert sum(stream.nbytes) == sum(len(d.encode("utf-8")) for d in docs)  # unknown characters included
        first_token_bytes = stream.nbytes[0]  # the first token is context only, never scored
        results = evaluate_stream(model.__class__.from_pretrained(tmp_path / kind), tok, stream, context=8, stride=5)
        assert results["bytes"] == sum(len(d.encode("utf-8")) for d in docs) - first_token_bytes, kind
        nats = results["loss"] * results["tokens"]
        assert results["bits_per_byte"] == pytest.approx(nats / (math.log(2) * results["bytes"]), rel=1e-9)


def test_metric_module_loads_by_path_and_weights_by_tokens():
    metric = evaluate.load(METRIC_PATH)
    metric.add_batch(nats=[3.0, 1.0], tokens=[2, 2], bytes=[5, 3])
    metric.add_batch(nats=[2.0], tokens=[4], bytes=[8])
    out = metric.compute()
    assert out["loss"] == pytest.approx(6.0 / 8) and out["perplexity"] == pytest.approx(math.exp(6.0 / 8))
    assert out["bits_per_byte"] == pytest.approx(6.0 / (math.log(2) * 16))
    assert (out["tokens"], out["bytes"]) == (8, 16)


def test_recipe_prints_table_and_writes_json(ckpt, capsys):
    path, model, tok, heldout = ckpt
    results = load_recipe("evaluate").main(["--model", str(path), "--files", str(heldout), "--context", "16"])
    written = json.loads((path / "evaluation.json").read_text())
    assert written["loss"] == pytest.approx(results["loss"]) and written["files"] == [str(heldout.resolve())]
    assert written["stride"] is None and written["context"] == 16
    stream = token_stream([p for p in heldout.read_text().split("\n\n") if p.strip()], tok)
    assert written["loss"] == pytest.approx(evaluate_stream(model, tok, stream, context=16)["loss"], rel=1e-6)
    out = capsys.readouterr().out
    assert "bits per byte" in out and f"{results['perplexity']:.3f}" in out


def _no_weights(path, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((path / "config.json").read_text())
    return bare


def _no_tokenizer(path, tmp_path):
    bare = _no_weights(path, tmp_path)
    (bare / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    return bare


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_file", "--files"),
        ("stride_over_context", "--stride 65 is larger than the context 64"),
        ("stride_over_explicit_context", "--stride 20 is larger than --context 16"),
        ("no_weights", "no weights"),
        ("no_tokenizer", "no tokenizer"),
        ("missing_model", "no such model folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys, case, expected):
    path, _, _, heldout = ckpt
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model, files, extra = str(path), str(heldout), []
    if case == "empty_file":
        files = str(empty)
    elif case == "stride_over_context":
        extra = ["--stride", "65"]
    elif case == "stride_over_explicit_context":
        extra = ["--stride", "20", "--context", "16"]
    elif case == "no_weights":
        model = str(_no_weights(path, tmp_path))
    elif case == "no_tokenizer":
        model = str(_no_tokenizer(path, tmp_path))
    elif case == "missing_model":
        model = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("evaluate").main(["--model", model, "--files", files, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmkit: error:") and expected in err, err


def test_bad_input_exit_code_from_a_real_process(ckpt, tmp_path):
    path, _, _, _ = ckpt
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--model", str(path), "--files", str(empty)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "the file is empty" in proc.stderr, proc.stderr
