"""When does ``--torch_compile true`` pay for its compile? Steps until a compiled run's total time beats eager.

    python benchmarks/bench_compile.py --break_even                       # the tiny preset's shapes
    python benchmarks/bench_compile.py --break_even --steps 60 --repeats 3
    python benchmarks/bench_compile.py --break_even --bf16 false          # fp32, a CPU without AMX's default

Each run is a fresh subprocess training lmkit's model with `LMTrainer` and lmkit's defaults (``--bf16`` auto
unless given, fused AdamW, auto attention, auto loss chunk, allocator reuse) at the shapes of
``recipes/configs/tiny.yaml`` (4 layers x 128 dims, 4/2 heads, vocab 2048, 128 tokens, micro-batch 16), on random
tokens; only ``torch_compile`` differs.
The clock starts when training begins (imports and model construction, the same on both sides, are not counted)
and is read at every step's end, so a compiled run's first steps carry its compile. Three runs alternate per
repeat: eager, compiled with a cold inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``, as on a new machine), and
compiled with that cache warm (every later run of the same shapes on the machine).

Break-even N: the smallest step count at which the compiled run's time from the start of training to the end of
step N is no more than the eager run's. When it is not reached within ``--steps``, it is extrapolated from the
steady step times (median of the last half of the steps): N = k + (T_compiled(k) - T_eager(k)) / (s_eager -
s_compiled); "never" if compiled steps are not faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_finetune import cpu_name, run_child  # noqa: E402  (the sibling script's subprocess and CPU helpers)

TINY = {"vocab_size": 2048, "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
        "seq_len": 128, "batch_size": 16}  # fmt: skip  # recipes/configs/tiny.yaml


def child(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from lmkit import LMConfig, LMForCausalLM
    from lmkit.args import LMTrainingArguments
    from lmkit.collator import CausalLMCollator
    from lmkit.perf import resolve_attn_implementation
    from lmkit.runtime import configure_allocator
    from lmkit.trainer import LMTrainer

    T, B, V = spec["seq_len"], spec["batch_size"], spec["vocab_size"]
    torch.manual_seed(0)
    args = LMTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="lmkit-bench-compile-"), per_device_train_batch_size=B,
        max_steps=spec["steps"], logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, seed=0, torch_compile=spec["compile"], sample_prompt=None,
        bf16=spec["bf16"],
    )  # fmt: skip
    configure_allocator(args)  # the recipes' set-up step (prepare_run): --cpu_allocator_reuse
    config = LMConfig(
        vocab_size=V, hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=T,
    )  # fmt: skip
    config._attn_implementation = resolve_attn_implementation("auto", args, T)
    model = LMForCausalLM(config)
    rows = torch.randint(0, V - 1, (B * spec["steps"], T + 1), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": rows.tolist()})

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.ends = None, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter() - self.t0)

    clock = Clock()
    trainer = LMTrainer(
        model=model, args=args, train_dataset=data, data_collator=CausalLMCollator(pad_token_id=V - 1),
        callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    return {"ends": clock.ends, "bf16": bool(args.bf16), "attn": config._attn_implementation}


def steady(ends: list[float]) -> float:
    steps = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
    return statistics.median(steps[len(steps) // 2 :])


def break_even(compiled: list[float], eager: list[float]) -> tuple[float | None, bool]:
    """(steps, measured?) until the compiled run's elapsed time is no more than eager's; None: never."""
    for n, (c, e) in enumerate(zip(compiled, eager, strict=True), start=1):
        if c <= e:
            return n, True
    s_c, s_e = steady(compiled), steady(eager)
    if s_c >= s_e:
        return None, False
    k = len(compiled)
    return k + (compiled[-1] - eager[-1]) / (s_e - s_c), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--break_even", action="store_true", help="measure the compile break-even (the only mode)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--bf16", default="auto", choices=["auto", "true", "false"],
        help="lmkit's --bf16 for every run (auto: bf16 where the CPU has AMX; false: the fp32 that a CPU without "
        "AMX runs by default)",
    )  # fmt: skip
    for key, value in TINY.items():
        parser.add_argument(f"--{key}", type=int, default=value)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if not args.break_even:
        parser.error("pass --break_even")

    import torch

    shapes = {key: getattr(args, key) for key in TINY}
    bf16 = {"auto": "auto", "true": True, "false": False}[args.bf16]
    runs = {"eager": False, "compiled, cold cache": True, "compiled, warm cache": True}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="lmkit-inductor-")  # fresh per repeat: the cold run fills it, warm reuses
        for name, compiled in runs.items():
            env = os.environ | ({"TORCHINDUCTOR_CACHE_DIR": cache} if compiled else {})
            spec = {**shapes, "steps": args.steps, "compile": compiled, "name": name, "bf16": bf16}
            results[name].append(run_child(spec, __file__, env))
            ends = results[name][-1]["ends"]
            print(f"repeat {r + 1}/{args.repeats} {name}: first step {ends[0]:.2f} s, steady "
                  f"{steady(ends) * 1e3:.1f} ms/step, {args.steps} steps {ends[-1]:.2f} s", file=sys.stderr)  # fmt: skip

    def med_curve(name: str) -> list[float]:
        return [statistics.median(r["ends"][i] for r in results[name]) for i in range(args.steps)]

    eager = med_curve("eager")
    first = results["eager"][0]
    print(
        f"\nmachine: {cpu_name()}, {torch.get_num_threads()} threads; tiny preset shapes: {args.num_layers} layers x "
        f"{args.hidden_size} dims, {args.num_heads}/{args.num_kv_heads} heads, vocab {args.vocab_size}, seq "
        f"{args.seq_len}, micro-batch {args.batch_size}; bf16 {first['bf16']}; {args.steps} steps, median of "
        f"{args.repeats} alternating repeats"
    )
    header = (
        f"| {'run':20} | {'attention':>9} | {'step 1 (s)':>10} | {'steady ms/step':>14} | {'vs eager':>8} "
        f"| {f'{args.steps} steps (s)':>14} | {'break-even steps':>16} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in runs:
        curve = med_curve(name)
        s = statistics.median(steady(r["ends"]) for r in results[name])
        s_eager = statistics.median(steady(r["ends"]) for r in results["eager"])
        if name == "eager":
            even = "-"
        else:
            n, measured = break_even(curve, eager)
            even = "never" if n is None else f"{n:.0f}" + ("" if measured else " (extrap.)")
        print(
            f"| {name:20} | {results[name][0]['attn']:>9} | {curve[0]:>10.2f} | {s * 1e3:>14.1f} | "
            f"{s_eager / s:>7.2f}x | {curve[-1]:>14.2f} | {even:>16} |"
        )
    print("time from the start of training (imports and model construction excluded, the same on both sides)")


if __name__ == "__main__":
    main()
