"""Realized mixture vs the weights over the first 1,000 blocks: lmkit's order vs `datasets.interleave_datasets`.

    python benchmarks/bench_mixture.py                       # weights 0.7/0.3 and 0.5/0.3/0.15/0.05, seeds 0-19
    python benchmarks/bench_mixture.py --blocks 1000 --seeds 100

Each source is a literal `datasets.Dataset` of 10,000 one-token blocks whose id names the source, so no text is
tokenized. lmkit's side is `lmkit.mixture.mix_blocks` (the map-style mix; the stream follows the same
`source_choices` order); the reference is ``interleave_datasets(probabilities=..., seed=...,
stopping_strategy="first_exhausted")``. Reported: the largest gap, in percentage points, between a source's share of
the first ``--blocks`` blocks and its weight, over all sources, the worst and median seed. Target: within 2 points.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MIXES = {"0.7/0.3": [0.7, 0.3], "0.5/0.3/0.15/0.05": [0.5, 0.3, 0.15, 0.05]}


def gap_points(ids: list[int], weights: list[float], blocks: int) -> float:
    first = ids[:blocks]
    return max(abs(100 * sum(i // 100_000 == s for i in first) / len(first) - 100 * w) for s, w in enumerate(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--size", type=int, default=10_000, help="blocks per source")
    opts = parser.parse_args()

    from datasets import Dataset, interleave_datasets

    from lmkit.mixture import Source, mix_blocks

    print("| weights | blocks | seeds | lmkit worst / median gap (pp) | interleave_datasets worst / median gap (pp) |")
    print("|---|---|---|---|---|")
    for label, weights in MIXES.items():
        sources = [Source(name=f"s{i}", weight=w, files=("x",)) for i, w in enumerate(weights)]
        blocks = {s.name: Dataset.from_dict({"input_ids": [[i * 100_000 + b] for b in range(opts.size)]})
                  for i, s in enumerate(sources)}  # fmt: skip
        ours, theirs = [], []
        for seed in range(opts.seeds):
            mixed, _ = mix_blocks(blocks, sources, seed)
            ours.append(gap_points([r[0] for r in mixed[: opts.blocks]["input_ids"]], weights, opts.blocks))
            ref = interleave_datasets(list(blocks.values()), probabilities=weights, seed=seed,
                                      stopping_strategy="first_exhausted")  # fmt: skip
            theirs.append(gap_points([r[0] for r in ref[: opts.blocks]["input_ids"]], weights, opts.blocks))
        print(f"| {label} | {opts.blocks:,} | {opts.seeds} | {max(ours):.2f} / {statistics.median(ours):.2f} | "
              f"{max(theirs):.2f} / {statistics.median(theirs):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
