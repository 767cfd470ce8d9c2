"""Tokenize + pack throughput: lmkit's data pipeline vs run_clm.py's map(tokenize) + map(group_texts).

    python benchmarks/bench_data.py                  # bundled Shakespeare x 8 (~9 MB), BPE 8k, blocks of 1024
    python benchmarks/bench_data.py --copies 32 --block_size 2048

Both sides start from the same raw `datasets.Dataset` (one paragraph per row) and the same tokenizer, write their
results to the same kind of on-disk Arrow cache, and never reuse a cache (lmkit: ``--overwrite_cache``; the
reference: ``load_from_cache_file=False``). The reference is run_clm.py's algorithm, re-written here: the
tokenizer's ``__call__`` over batches of 1000 rows, then ``group_texts``, which concatenates each batch's lists
with ``chain`` and slices them into blocks (input_ids, attention_mask and labels). Runs alternate ``--repeats``
times; tokens/s is packed output tokens per second, median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run_clm_reference(raw, tokenizer, block_size: int):
    """examples/pytorch/language-modeling/run_clm.py: tokenize_function + group_texts, default map batch size."""

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"], load_from_cache_file=False)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenized.map(group_texts, batched=True, load_from_cache_file=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of the bundled corpus to concatenate")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import datasets

    from lmkit.args import BUNDLED_CORPUS, DataArguments
    from lmkit.data import build_lm_datasets, load_raw_datasets
    from lmkit.tokenizer import build_tokenizer

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="lmkit-bench-data-"))
    corpus = work / "corpus.txt"
    corpus.write_text(BUNDLED_CORPUS.read_text(encoding="utf-8") * args.copies, encoding="utf-8")
    data_args = DataArguments(
        train_files=[str(corpus)], validation_split=0.0, block_size=args.block_size, overwrite_cache=True,
        cache_dir=str(work / "cache"),
    )  # fmt: skip
    raw = load_raw_datasets(data_args, seed=0)
    tokenizer = build_tokenizer("train", (r["text"] for r in raw["train"]), args.vocab_size)

    times: dict[str, list[float]] = {"lmkit": [], "run_clm": []}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = build_lm_datasets(raw, tokenizer, data_args)["train"]
        times["lmkit"].append(time.perf_counter() - start)
        tokens["lmkit"] = len(out) * (args.block_size + 1)

        start = time.perf_counter()
        ref = run_clm_reference(raw["train"], tokenizer, args.block_size)
        times["run_clm"].append(time.perf_counter() - start)
        tokens["run_clm"] = len(ref) * args.block_size

    rate = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    print(
        f"corpus: bundled Shakespeare x {args.copies} ({corpus.stat().st_size / 1e6:.1f} MB, {len(raw['train']):,} "
        f"paragraphs), byte-level BPE {len(tokenizer):,} tokens, blocks of {args.block_size}; median of "
        f"{args.repeats} alternating runs"
    )
    print("| pipeline                               | seconds | tokens out | tokens/s  | vs run_clm |")
    print("|----------------------------------------|---------|------------|-----------|------------|")
    for key, name in (("lmkit", "lmkit build_lm_datasets"), ("run_clm", "run_clm.py map(tokenize)+group_texts")):
        print(
            f"| {name:38} | {statistics.median(times[key]):7.2f} | {tokens[key]:10,} | {rate[key]:9,.0f} | "
            f"{rate[key] / rate['run_clm']:9.2f}x |"
        )


if __name__ == "__main__":
    main()
