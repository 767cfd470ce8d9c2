"""Training throughput of lmkit's pretraining path against stock transformers, and each speed lever on its own.

    python benchmarks/bench_throughput.py                       # main table: lmkit vs GPT2LMHeadModel vs Llama
    python benchmarks/bench_throughput.py --levers              # + lmkit plain fp32 and one lever at a time
    python benchmarks/bench_throughput.py --device cuda --hidden_size 2048 --num_layers 16 --seq_len 2048 ...

Every run is a fresh subprocess that trains for ``--steps`` optimizer steps with a `Trainer` on the same packed
Shakespeare tokens (lmkit: `LMTrainer` + `CausalLMCollator` + `LMForCausalLM` with lmkit's defaults; references:
the stock `Trainer` with its defaults, `labels=input_ids`). Tokens/s is timed from the end of step ``--warmup``
to the last step. Runs are interleaved (A B C A B C ...) ``--repeats`` times and the median is reported, with
ratios against the references measured in the same invocation; the matmul peak for MFU is measured in the same
invocation too (best of several rounds, between the runs). All models have the same non-embedding parameter count
(within 5%), sequence length, micro-batch, dtype and optimizer (AdamW, fused where torch has it).

On a CPU the table ends with the GEMM floor (`gemm_floor_seconds`): one step's matrix multiplies timed alone, at
their shapes, in the run's dtype. No implementation on this machine's GEMM kernels steps faster, so the floor over
the Llama row's step time is the ceiling of any "x Llama" target at these shapes and dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> (model kind, lmkit overrides). "plain" is the fp32 eager path with every lever off; each lever row turns
# exactly one on. "lmkit" is the default configuration.
PLAIN = {
    "bf16": False, "torch_compile": False, "optim": "adamw_torch", "attn": "eager", "loss_chunk_size": 0,
    "cpu_allocator_reuse": False,
}  # fmt: skip
LEVERS = {
    "lmkit plain fp32": PLAIN,
    "  + bf16 autocast": {**PLAIN, "bf16": True},
    "  + torch.compile": {**PLAIN, "torch_compile": True},
    "  + fused AdamW": {**PLAIN, "optim": "adamw_torch_fused"},
    "  + SDPA": {**PLAIN, "attn": "sdpa"},
    "  + chunked loss": {**PLAIN, "loss_chunk_size": 1024},
    "  + allocator reuse": {**PLAIN, "cpu_allocator_reuse": True},
}


def lmkit_defaults(args: argparse.Namespace) -> dict:
    return {
        "bf16": args.dtype == "bf16",
        "torch_compile": True if args.compile else "auto",  # auto: decided for the run's planned length
        "optim": "adamw_torch_fused",
        "attn": "auto",  # eager for compiled CPU runs of <= 256 tokens, else sdpa (lmkit.perf)
        "loss_chunk_size": None,  # auto: 2**25 logits per chunk
        "cpu_allocator_reuse": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# Child: one training run
# ---------------------------------------------------------------------------------------------------------------


def child(spec: dict) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from lmkit import LMConfig, LMForCausalLM
    from lmkit.args import LMTrainingArguments
    from lmkit.collator import CausalLMCollator
    from lmkit.perf import (
        planned_training_flops,
        resolve_attn_implementation,
        resolve_torch_compile,
        training_flops_per_token,
    )
    from lmkit.runtime import configure_allocator, num_parameters
    from lmkit.trainer import LMTrainer

    T, B, V, H, L = spec["seq_len"], spec["batch_size"], spec["vocab_size"], spec["hidden_size"], spec["num_layers"]
    heads = spec["num_heads"]
    tokens = np.load(spec["tokens"])
    kind, opts = spec["kind"], spec["opts"]
    torch.manual_seed(0)

    def training_args(args_cls: type, **extra) -> TrainingArguments:
        return args_cls(
            output_dir=out_dir, per_device_train_batch_size=B, max_steps=spec["steps"], learning_rate=3e-4,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=spec["steps"], save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=spec["device"] == "cpu",
            dataloader_drop_last=True, seed=0, **extra,
        )  # fmt: skip

    out_dir = tempfile.mkdtemp(prefix="lmkit-bench-")
    decision = None
    if kind == "lmkit":
        args_cls, trainer_cls = LMTrainingArguments, LMTrainer
        extra = {"optim": opts["optim"], "bf16": opts["bf16"], "torch_compile": opts["torch_compile"],
                 "cpu_allocator_reuse": opts["cpu_allocator_reuse"]}  # fmt: skip
        extra["peak_flops"] = spec["peak"][spec["dtype"] if opts["bf16"] else "fp32"]
        run_args = training_args(args_cls, **extra)
        config = LMConfig(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=heads, max_position_embeddings=T,
            loss_chunk_size=opts["loss_chunk_size"],
        )  # fmt: skip
        # What the recipe decides for a run of spec["planned"] steps (this one times only spec["steps"])
        plan = SimpleNamespace(max_steps=spec.get("planned", spec["steps"]), gradient_accumulation_steps=1,
                               per_device_train_batch_size=B)  # fmt: skip
        decision = resolve_torch_compile(run_args, planned_training_flops(plan, None, config, T))
        config._attn_implementation = resolve_attn_implementation(opts["attn"], run_args, T)
        model = LMForCausalLM(config)
        n_rows = len(tokens) // (T + 1)
        rows = tokens[: n_rows * (T + 1)].reshape(n_rows, T + 1)  # the collator shifts: T inputs, T targets
        data = Dataset.from_dict({"input_ids": rows.tolist()})
        collator = CausalLMCollator(pad_token_id=V - 1)
    else:
        if kind == "gpt2":
            # GPT-2's 4x GELU MLP (8 h^2) matches SwiGLU's 3 x h x 8/3 h; no dropout, as in lmkit.
            config = GPT2Config(
                vocab_size=V, n_positions=T, n_embd=H, n_layer=L, n_head=heads, n_inner=4 * H,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
            model = GPT2LMHeadModel(config)
        else:
            ref = LMConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=heads)
            config = LlamaConfig(
                vocab_size=V, hidden_size=H, intermediate_size=ref.intermediate_size, num_hidden_layers=L,
                num_attention_heads=heads, max_position_embeddings=T, tie_word_embeddings=True,
            )  # fmt: skip
            model = LlamaForCausalLM(config)
        n_rows = len(tokens) // T
        rows = tokens[: n_rows * T].reshape(n_rows, T)
        data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
        collator = default_data_collator
        args_cls, trainer_cls = TrainingArguments, Trainer
        # stock defaults otherwise (optim adamw_torch_fused, sdpa)
        run_args = training_args(args_cls, bf16=spec["dtype"] == "bf16")

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.first, self.t0, self.t1, self.logs = None, None, None, {}

        def on_step_end(self, args, state, control, **kwargs):
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            if state.global_step == 1:
                self.first = time.perf_counter()  # the first step, compile included
            if state.global_step == spec["warmup"]:
                self.t0 = time.perf_counter()
            self.t1 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.update(logs or {})

    clock = Clock()
    if trainer_cls is LMTrainer:
        configure_allocator(run_args)  # what lmkit's recipes do in their set-up step (prepare_run)
    trainer = trainer_cls(model=model, args=run_args, train_dataset=data, data_collator=collator, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    timed_steps = spec["steps"] - spec["warmup"]
    tok_s = timed_steps * B * T / (clock.t1 - clock.t0)
    return {
        "tokens_per_second": tok_s,
        "flops_per_token": training_flops_per_token(config, T),
        "non_embedding_params": num_parameters(model, exclude_embeddings=True),
        "logged_mfu": clock.logs.get("mfu"),
        "data_wait_fraction": clock.logs.get("data_wait_fraction"),
        "loss": clock.logs.get("train_loss"),
        "compile": decision,
        "first_step_s": clock.first - start,
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent: data, interleaved runs, peak, table
# ---------------------------------------------------------------------------------------------------------------


def prepare_tokens(path: Path, vocab_size: int) -> None:
    import numpy as np

    from lmkit.args import BUNDLED_CORPUS
    from lmkit.tokenizer import build_tokenizer

    text = BUNDLED_CORPUS.read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p]
    tokenizer = build_tokenizer("train", paragraphs, vocab_size)
    ids = [i for enc in tokenizer.backend_tokenizer.encode_batch_fast(paragraphs) for i in enc.ids + [0]]
    np.save(path, np.asarray(ids, dtype=np.int32))


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_peaks(device: str, dtype: str) -> dict:
    import torch

    from lmkit.perf import measure_matmul_peak

    size = 1024 if device == "cpu" else 8192
    peaks = {"fp32": measure_matmul_peak(torch.float32, device, size=size)}
    if dtype == "bf16":
        peaks["bf16"] = measure_matmul_peak(torch.bfloat16, device, size=size)
    return peaks


def step_gemms(config, batch_size: int, seq_len: int) -> list[list[list[tuple[int, int, int, int, float]]]]:
    """The matrix multiplies of one training step of a Llama-architecture ``config`` on ``batch_size`` rows of
    ``seq_len`` tokens, as groups of equivalent alternatives; each alternative is a list of GEMMs ``(batch, m, k,
    n, weight)``: ``batch`` products of (m, k) x (k, n), counted ``weight`` times.

    Every linear layer (q, k, v, o, gate, up, down per layer, and the head) costs a forward, an input-gradient and
    a weight-gradient GEMM. q/k/v, and gate/up, may also run as one wider GEMM over concatenated weights: the two
    forms are alternatives. Attention costs QK^T and PV forward and, backward, the same two shapes twice (dP and
    dV, dQ and dK); they are weighted 1/2, because a causal kernel can skip the masked half."""
    M, H, T = batch_size * seq_len, config.hidden_size, seq_len
    hd, nh, nkv, inter = (
        config.head_dim,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
    )

    def linear(k: int, n: int, weight: float = 1.0) -> list[tuple[int, int, int, int, float]]:
        # forward x W^T (M, k) x (k, n); input gradient g W (M, n) x (n, k); weight gradient g^T x (n, M) x (M, k)
        return [(1, M, k, n, weight), (1, M, n, k, weight), (1, n, M, k, weight)]

    attention = [(batch_size * nh, T, hd, T, 1.5), (batch_size * nh, T, T, hd, 1.5)]  # 3 uses each, half counted
    layer = [
        [linear(H, nh * hd) + linear(H, nkv * hd, 2), linear(H, (nh + 2 * nkv) * hd)],  # q, k, v
        [linear(nh * hd, H)],  # o
        [attention],
        [linear(H, inter, 2), linear(H, 2 * inter)],  # gate, up
        [linear(inter, H)],  # down
    ]
    return layer * config.num_hidden_layers + [[linear(H, config.vocab_size)]]  # the head


def gemm_flops(gemms: list[tuple[int, int, int, int, float]]) -> float:
    return sum(2 * b * m * k * n * w for b, m, k, n, w in gemms)


def gemm_floor_seconds(args: argparse.Namespace) -> float:
    """Seconds one training step's matrix multiplies (`step_gemms`) take on their own, each timed in isolation at
    its exact shape, counting the faster of each group's alternatives.

    Nothing else (norms, activations, softmax, the loss, the optimizer, autocast's weight casts) is counted, and the
    operands are warm in cache, so this is a lower bound on any implementation's step time with this machine's
    GEMM kernels in this dtype: the timed runs' step times over it say how much room there is. CPU only (a GPU
    timing would need synchronizing)."""
    import torch

    from lmkit import LMConfig
    from lmkit.perf import best_seconds_per_call

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32  # autocast runs linears and bmm in bf16
    config = LMConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
    )  # fmt: skip
    timed: dict[tuple[int, int, int, int], float] = {}

    def seconds(b: int, m: int, k: int, n: int) -> float:
        # The fastest of three memory layouts: both operands row-major, the second stored transposed (nn.Linear's
        # forward, x W^T) or the first (a weight gradient, g^T x). Other layouts are an implementation's choice.
        if (b, m, k, n) not in timed:
            x, y = torch.randn(b, m, k).to(dtype), torch.randn(b, k, n).to(dtype)
            xt, yt = (
                x.transpose(-1, -2).contiguous().transpose(-1, -2),
                y.transpose(-1, -2).contiguous().transpose(-1, -2),
            )
            if b == 1:
                x, y, xt, yt = x[0], y[0], xt[0], yt[0]
            timed[b, m, k, n] = min(
                best_seconds_per_call(lambda a=a, c=c: a @ c, min_seconds=0.05, repeats=5)
                for a, c in ((x, y), (x, yt), (xt, y))
            )
        return timed[b, m, k, n]

    return sum(
        min(sum(w * seconds(b, m, k, n) for b, m, k, n, w in alternative) for alternative in group)
        for group in step_gemms(config, args.batch_size, args.seq_len)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument(
        "--compile", action="store_true", help="lmkit's run with --torch_compile (plus a row without it)"
    )
    parser.add_argument("--levers", action="store_true", help="also run lmkit plain fp32 and each lever alone")
    parser.add_argument("--only_levers", action="store_true", help="run the lever rows only")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--planned_steps", type=int, default=2000,
        help="the run length `--torch_compile auto` decides for in the 'lmkit, defaults' row (the 'short' row plans "
        "--steps); only --steps are run",
    )  # fmt: skip
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="lmkit-bench-"))
    tokens = work / "tokens.npy"
    prepare_tokens(tokens, args.vocab_size)
    base = {
        "tokens": str(tokens), "device": args.device, "dtype": args.dtype, "steps": args.steps,
        "warmup": args.warmup, "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
        "num_layers": args.num_layers, "num_heads": args.num_heads, "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }  # fmt: skip
    runs: dict[str, dict] = {}
    if not args.only_levers:
        if args.compile:
            runs["lmkit, compile"] = {"kind": "lmkit", "opts": lmkit_defaults(args)}
            runs["lmkit, no compile"] = {"kind": "lmkit", "opts": {**lmkit_defaults(args), "torch_compile": False}}
        else:  # what `--torch_compile auto` decides for a long run, and for one as short as the timed steps
            runs["lmkit, defaults"] = {"kind": "lmkit", "opts": lmkit_defaults(args), "planned": args.planned_steps}
            runs["lmkit, defaults, short"] = {"kind": "lmkit", "opts": lmkit_defaults(args)}
        runs["Llama (transformers)"] = {"kind": "llama", "opts": {}}
        runs["GPT-2 (transformers)"] = {"kind": "gpt2", "opts": {}}
    if args.levers or args.only_levers:
        runs.update({name: {"kind": "lmkit", "opts": opts} for name, opts in LEVERS.items()})

    results: dict[str, list[dict]] = {name: [] for name in runs}
    peaks: list[dict] = []
    floors: list[float] = []
    for r in range(args.repeats):
        peaks.append(measure_peaks(args.device, args.dtype))
        if args.device == "cpu":
            floors.append(gemm_floor_seconds(args))
        for name, run in runs.items():
            spec = {**base, **run, "name": name, "peak": peaks[-1] | {"bf16": peaks[-1].get("bf16", 0.0)}}
            results[name].append(run_child(spec))
            print(f"repeat {r + 1}/{args.repeats} {name}: {results[name][-1]['tokens_per_second']:.0f} tok/s",
                  file=sys.stderr)  # fmt: skip
    peak = {k: statistics.median(p[k] for p in peaks) for k in peaks[0]}

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(
        f"\nmachine: {torch.get_num_threads()} threads, {args.device}; model: {args.num_layers} layers x "
        f"{args.hidden_size} dims, {args.num_heads} heads, vocab {args.vocab_size}, seq {args.seq_len}, "
        f"micro-batch {args.batch_size}, {args.dtype}; {args.steps - args.warmup} timed steps, median of "
        f"{args.repeats} interleaved repeats"
    )
    print("measured matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))
    header = (
        f"| {'run':22} | {'non-emb params':>14} | {'tokens/s':>9} | {'vs GPT-2':>8} | {'vs Llama':>8} "
        f"| {'vs plain':>8} | {'MFU':>6} | {'data wait':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    gpt2 = med("GPT-2 (transformers)", "tokens_per_second") if "GPT-2 (transformers)" in results else None
    llama = med("Llama (transformers)", "tokens_per_second") if "Llama (transformers)" in results else None
    plain = med("lmkit plain fp32", "tokens_per_second") if "lmkit plain fp32" in results else None
    for name, run in runs.items():
        tok_s = med(name, "tokens_per_second")
        bf16 = run["opts"].get("bf16", args.dtype == "bf16") if run["kind"] == "lmkit" else args.dtype == "bf16"
        run_peak = peak["bf16" if bf16 else "fp32"]
        mfu = tok_s * results[name][0]["flops_per_token"] / run_peak
        waits = [r["data_wait_fraction"] for r in results[name] if r["data_wait_fraction"] is not None]
        wait = f"{statistics.median(waits):.2%}" if waits else "-"
        vs_gpt2 = f"{tok_s / gpt2:.2f}x" if gpt2 else "-"
        vs_llama = f"{tok_s / llama:.2f}x" if llama else "-"
        vs_plain = f"{tok_s / plain:.2f}x" if plain and run["kind"] == "lmkit" else "-"
        print(
            f"| {name:22} | {results[name][0]['non_embedding_params']:>14,} | {tok_s:>9.0f} | {vs_gpt2:>8} | "
            f"{vs_llama:>8} | {vs_plain:>8} | {mfu:>6.1%} | {wait:>9} |"
        )
    print("MFU: model FLOPs (6N + 12 L d T per token) over the matmul peak measured for the run's dtype")
    if floors:
        floor = statistics.median(floors)
        ceiling = args.batch_size * args.seq_len / floor
        print(
            f"GEMM floor: {floor * 1e3:.1f} ms/step (every matmul of a step alone, at its shape, nothing else: "
            f"`gemm_floor_seconds`), so at most {ceiling:.0f} tok/s in {args.dtype} on this machine"
            + (f"; {ceiling / llama:.2f}x the Llama row is the ceiling on these GEMM kernels" if llama else "")
        )
    for name, run in runs.items():
        if run["kind"] == "lmkit":
            first = statistics.median(r["first_step_s"] for r in results[name])
            print(f"{name}: {results[name][0]['compile']}; first step {first:.1f} s (median)")


if __name__ == "__main__":
    main()
