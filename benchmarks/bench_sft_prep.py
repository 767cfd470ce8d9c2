"""SFT data preparation: lmkit's `build_sft_datasets` against TRL's `SFTTrainer` preparation, on the same chat rows.

    python benchmarks/bench_sft_prep.py --rows 100000 --repeats 2 --num_proc 1

Both sides start from the same JSONL file of chat rows (generated here, seeded), with the same byte-level BPE
tokenizer (trained here on the rows) and ChatML template, and the same length limit (``--block_size + 1`` tokens):

- lmkit: `lmkit.sft.build_sft_datasets` with a fresh datasets cache ("first run": load the JSON, check every row,
  render, tokenize, mask answers, drop over-long examples), then again on that cache ("second run");
- TRL: `datasets.load_dataset("json")` with a fresh cache, then `SFTTrainer._prepare_dataset` as `SFTTrainer.__init__`
  calls it (tokenize with the chat template, truncate to ``max_length``). TRL's default for messages learns every
  token; its answer-only mask (``assistant_only_loss``) needs a template with ``{% generation %}`` blocks, so
  lmkit does strictly more work per row here (the answer mask).

Runs alternate (TRL, lmkit, TRL, lmkit, ...) in one process; the figure is the ratio of medians. TRL is a
benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

WORDS = (
    "the a model data train token loss answer question why how what when where is are was were be can could "
    "should would will python code list dict function return value error file line number text chat user system "
    "assistant help please thanks explain write short long simple example"
).split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` conversations: an optional system turn, then one to three user/assistant exchanges of random words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(3, 10)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text(5, 30)}, {"role": "assistant", "content": text(10, 80)}]
        rows.append({"messages": messages})
    return rows


def make_tokenizer(rows: list[dict]):
    from lmkit.sft import resolve_chat_template
    from lmkit.tokenizer import build_tokenizer

    texts = (m["content"] for r in rows[:5000] for m in r["messages"])
    tokenizer = build_tokenizer("train", texts, vocab_size=4096)
    template, markers = resolve_chat_template(None, tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": markers}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer


def run_lmkit(path: Path, tokenizer, block_size: int, num_proc: int, cache_dir: str) -> int:
    from lmkit.args import DataArguments
    from lmkit.sft import build_sft_datasets

    args = DataArguments(
        train_files=[str(path)], validation_split=0.0, block_size=block_size, cache_dir=cache_dir,
        preprocessing_num_workers=num_proc,
    )  # fmt: skip
    return len(build_sft_datasets(args, tokenizer)["train"])


def run_trl(path: Path, tokenizer, block_size: int, num_proc: int, cache_dir: str) -> int:
    import datasets
    from trl import SFTConfig, SFTTrainer

    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    args = SFTConfig(
        output_dir=cache_dir, max_length=block_size + 1, dataset_num_proc=num_proc if num_proc > 1 else None,
        report_to="none", use_cpu=True, bf16=False,
    )  # fmt: skip
    # The state `SFTTrainer.__init__` sets before it calls `_prepare_dataset` (no model needed to prepare data).
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=False)
    return len(SFTTrainer._prepare_dataset(trainer, ds, tokenizer, args, False, None, "train"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num_proc", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=511)
    opts = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        rows = chat_rows(opts.rows)
        path = Path(tmp) / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tokenizer = make_tokenizer(rows)
        times: dict[str, list[float]] = {"trl": [], "lmkit first": [], "lmkit second": []}
        for i in range(opts.repeats):
            for name, fn in (("trl", run_trl), ("lmkit first", run_lmkit)):
                cache = f"{tmp}/cache-{name.split()[0]}-{i}"
                t0 = time.perf_counter()
                n = fn(path, tokenizer, opts.block_size, opts.num_proc, cache)
                times[name].append(time.perf_counter() - t0)
                print(f"{name:13s} run {i}: {times[name][-1]:7.2f} s, {n} rows", flush=True)
                if name == "lmkit first":
                    t0 = time.perf_counter()
                    run_lmkit(path, tokenizer, opts.block_size, opts.num_proc, cache)
                    times["lmkit second"].append(time.perf_counter() - t0)
                    print(f"lmkit second  run {i}: {times['lmkit second'][-1]:7.2f} s (cache)", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{opts.rows} chat rows, num_proc {opts.num_proc}, max length {opts.block_size + 1}; medians:")
    for name, t in med.items():
        print(f"  {name:13s} {t:7.2f} s   TRL / this = {med['trl'] / t:6.2f}x")


if __name__ == "__main__":
    main()
