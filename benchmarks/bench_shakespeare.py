"""Sample efficiency and wall time on shakespeare-char: lmkit's recipe vs a nanoGPT-equivalent reference.

    python benchmarks/bench_shakespeare.py                 # both, 2000 steps each (a few minutes on 2 cores)
    python benchmarks/bench_shakespeare.py --skip_reference

lmkit: ``recipes/pretrain.py --config recipes/configs/shakespeare-char.yaml`` in a subprocess, wall time from
launch to exit (imports, tokenizer, data, training, evals, save, sample), val loss from its final evaluation over
every validation block. Reference: nanoGPT's train.py algorithm re-written here (GPT-2 block with bias-free
LayerNorm, GELU MLP, tied embeddings, learned positions; AdamW lr 1e-3, betas (0.9, 0.99), wd 0.1, 100 warm-up
steps, cosine to 1e-4, clip 1.0; random 64-character windows; eval every 250 steps over 20 batches per split, as in
the README's CPU command), also a subprocess, also timed launch to exit. Its val loss is reported both as
nanoGPT's estimate (20 random batches) and over every non-overlapping validation window, as lmkit computes it.
Both use the same corpus split (first 90% / last 10% of the characters; lmkit's line split lands 2 characters
later) and the same budget: 2000 steps x 12 x 64 characters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def nanogpt_reference(steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(1337)
    text = (REPO / "lmkit" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    V, T, B, C, L, H = len(chars), 64, 12, 128, 4, 4

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, bias=False)
            self.c_attn = nn.Linear(C, 3 * C, bias=False)
            self.c_proj = nn.Linear(C, C, bias=False)
            self.ln_2 = nn.LayerNorm(C, bias=False)
            self.c_fc = nn.Linear(C, 4 * C, bias=False)
            self.mlp_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, C)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C, bias=False)
            self.lm_head = nn.Linear(C, V, bias=False)
            self.lm_head.weight = self.wte.weight
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))

    def get_batch(split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(split) - T, (B,))
        return torch.stack([split[i : i + T] for i in ix]), torch.stack([split[i + 1 : i + 1 + T] for i in ix])

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), fused=True,
    )  # fmt: skip

    def lr_at(it: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = min(1.0, (it - 100) / (steps - 100))
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    @torch.no_grad()
    def estimate(split: torch.Tensor) -> float:
        model.eval()
        loss = sum(model(*get_batch(split)).item() for _ in range(20)) / 20
        model.train()
        return loss

    estimate_val = float("nan")
    for it in range(steps + 1):
        if it % 250 == 0 or it == steps:
            estimate(train)
            estimate_val = estimate(val)
        if it == steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        loss = model(*get_batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # over every non-overlapping 64-character window of the validation text, like lmkit
        model.eval()
        m = (len(val) - 1) // T
        x, y = val[: m * T].view(m, T), val[1 : m * T + 1].view(m, T)
        full_val = (
            sum(model(x[i : i + 256], y[i : i + 256]).item() * len(x[i : i + 256]) for i in range(0, m, 256)) / m
        )
    return {"val_loss_estimate": estimate_val, "val_loss_full": full_val}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument(
        "--warm_compile_cache",
        action="store_true",
        help="let lmkit reuse torch.compile's on-disk cache (default: a fresh cache, so the compile is timed)",
    )
    parser.add_argument(
        "--extra", default="", help="extra flags for lmkit's recipe, e.g. --extra='--torch_compile true'"
    )
    args = parser.parse_args()
    if args.reference_child is not None:
        print(json.dumps(nanogpt_reference(args.reference_child)))
        return

    out = Path(tempfile.mkdtemp(prefix="lmkit-shakespeare-"))
    rows = []
    start = time.perf_counter()
    cmd = [sys.executable, "recipes/pretrain.py", "--config", "recipes/configs/shakespeare-char.yaml",
           "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--max_steps", str(args.steps),
           *shlex.split(args.extra)]  # fmt: skip
    env = dict(os.environ)
    if not args.warm_compile_cache:  # a first run compiles from scratch: time that, not a cache hit
        env["TORCHINDUCTOR_CACHE_DIR"] = str(out / "inductor-cache")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"lmkit recipe failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "eval_results.json").read_text())
    train = json.loads((out / "train_results.json").read_text())
    rows.append(("lmkit shakespeare-char", metrics["eval_loss"], None, wall, train.get("train_tokens_per_second")))
    if not args.skip_reference:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--reference_child", str(args.steps)], cwd=REPO,
                              capture_output=True, text=True, check=True)  # fmt: skip
        wall = time.perf_counter() - start
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(("nanoGPT-equivalent", ref["val_loss_full"], ref["val_loss_estimate"], wall, None))
    print(f"{args.steps} steps x 12 x 64 tokens; wall time = launch to exit of each subprocess")
    print("| run                    | val loss (all windows) | nanoGPT estimate | wall (s) | wall vs reference |")
    print("|------------------------|------------------------|------------------|----------|-------------------|")
    ref_wall = rows[-1][3] if len(rows) > 1 else None
    for name, loss, estimate, wall, _ in rows:
        est = f"{estimate:.3f}" if estimate is not None else "-"
        ratio = f"{wall / ref_wall:.2f}x" if ref_wall else "-"
        print(f"| {name:22} | {loss:22.3f} | {est:>16} | {wall:8.1f} | {ratio:>17} |")


if __name__ == "__main__":
    main()
