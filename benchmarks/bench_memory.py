"""Peak RSS of one training step at vocab 32k, sequence 1024: lmkit's chunked fp32 loss vs transformers' Llama.

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --batch_size 4 --hidden_size 512 --dtype fp32

Each model runs in a fresh subprocess (peak RSS is a high-water mark; it never goes down), builds the same
Llama-shaped model (lmkit's LMForCausalLM vs LlamaForCausalLM, same weights' shapes), and runs one full training
step: forward, backward, AdamW step. Reported: the process's peak RSS (ru_maxrss), and the step's own increase
over the RSS just before it. Runs alternate ``--repeats`` times; medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmkit import LMConfig, LMForCausalLM

    V, T, B, H, L = spec["vocab_size"], spec["seq_len"], spec["batch_size"], spec["hidden_size"], spec["num_layers"]
    torch.manual_seed(0)
    lm_config = LMConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=H // 64,
                         max_position_embeddings=T)  # fmt: skip
    if spec["kind"] == "lmkit":
        lm_config._attn_implementation = "sdpa"
        model = LMForCausalLM(lm_config)
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=H, intermediate_size=lm_config.intermediate_size, num_hidden_layers=L,
            num_attention_heads=H // 64, max_position_embeddings=T, tie_word_embeddings=True,
        ))  # fmt: skip
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, V, (B, T + 1))
    bf16 = spec["dtype"] == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if spec["kind"] == "lmkit":
                loss = model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).loss
            else:
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients and optimizer state stay, as in training

    before = rss_mib()
    start_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()
    step()  # second step: optimizer state exists, the steady state of training
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mib": peak, "step_increase_mib": peak - max(before, start_peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    spec = {k: v for k, v in vars(args).items() if k not in ("child", "repeats")}
    results: dict[str, list[dict]] = {"lmkit": [], "llama": []}
    for _ in range(args.repeats):
        for kind in results:
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "kind": kind})],
                                 capture_output=True, text=True, cwd=REPO, check=True)  # fmt: skip
            results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    print(
        f"one training step, vocab {args.vocab_size}, seq {args.seq_len}, micro-batch {args.batch_size}, "
        f"{args.num_layers} layers x {args.hidden_size} dims, {args.dtype}; median of {args.repeats}"
    )
    print("| run                  | peak RSS (MiB) | vs Llama | step increase (MiB) | vs Llama |")
    print("|----------------------|----------------|----------|---------------------|----------|")
    for kind, name in (("lmkit", "lmkit (chunked loss)"), ("llama", "Llama (transformers)")):
        peak, inc = med(kind, "peak_rss_mib"), med(kind, "step_increase_mib")
        print(
            f"| {name:20} | {peak:14.0f} | {peak / med('llama', 'peak_rss_mib'):7.2f}x | {inc:19.0f} | "
            f"{inc / med('llama', 'step_increase_mib'):7.2f}x |"
        )


if __name__ == "__main__":
    main()
