"""Supervised fine-tuning throughput and peak RSS of lmkit's finetune path against TRL's `SFTTrainer`.

    python benchmarks/bench_finetune.py                     # lmkit vs TRL: full unpacked, packed, LoRA
    python benchmarks/bench_finetune.py --dtype fp32 --paths grouped packed padfree bf16 compiled
    python benchmarks/bench_finetune.py --rows 64 --repeats 1 --hidden_size 32 --num_layers 2   # a smoke run

One deterministic set of prompt/completion rows (Shakespeare snippets of varied lengths, every one within
``--block_size + 1`` tokens, so neither side drops or truncates) trains for one epoch on each side from the same
weights: an lmkit checkpoint (`LMForCausalLM`) saved once, and the same weights exported to a stock
`LlamaForCausalLM` with `lmkit.hub.to_llama` for TRL. lmkit runs the pieces `recipes/finetune.py` wires together
(`load_tokenizer`, `load_model`, `build_sft_datasets` on the rows' JSONL file, `apply_lora`, `LMTrainer`,
`sft_collator`); TRL gets the same token ids pre-tokenized (``input_ids`` + ``completion_mask``,
``completion_only_loss=True``), so both learn exactly the same answer tokens. Same micro-batch, maximum length,
dtype (``--dtype``: bf16 autocast or fp32), fused AdamW, constant learning rate, no warmup, no weight decay, clip
1.0, no activation checkpointing (TRL's default turns it on; off on both), seed 0.

Rows of the table:

- ``full``: every weight trains, one example per row, padded to the batch's longest (TRL: ``packing=False``).
- ``packed``: lmkit ``packing=True`` (greedy rows of ``block_size + 1`` tokens, positions restart per example);
  TRL ``packing=True``, its default best-fit-decreasing strategy, which makes it padding-free (each batch is
  flattened into one row).
- ``lora``: peft LoRA r=16, alpha 32, dropout 0.05 on every linear layer but the head, unpacked, on both sides.

Each side batches as its recipe does by default: lmkit's unpacked rows (``full``, ``lora``) are grouped by length
(`lmkit.finetune.default_sft_sampling`), TRL's are drawn at random; ``--lmkit_order random`` gives lmkit TRL's
order (the same batches on both sides: equal losses), ``--paths full`` adds that run to the paths table.

Trained tokens/s counts the loss-bearing tokens of the batches of the timed steps (from the end of step
``--warmup`` to the last step), counted in the batches each side's collator produced. Peak RSS is the child
process's ``ru_maxrss`` (each run is a fresh subprocess; imports included, the same on both sides). Runs alternate
lmkit / TRL ``--repeats`` times; the table holds medians and ratios against TRL from the same invocation.
``train loss`` is the mean step loss of the epoch, ``eval loss`` the loss on the same held-out examples after it:
equal losses show the same work was done (packed rows differ a little: the two sides pack differently).
``--paths`` adds lmkit-only runs of other SFT paths on the same examples, in a second table (see PATHS).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IGNORE_INDEX = -100
# row -> (packing, LoRA, learning rate); lmkit's path comparison adds the length-grouped sampler.
ROWS = {"full": (False, False, 5e-5), "packed": (True, False, 5e-5), "lora": (False, True, 2e-4)}
# lmkit's SFT paths (--paths), each an lmkit run of the full row's examples: "full" pads each batch to its longest
# example, rounded up to a multiple of 16 (the recipe's --pad_to_multiple_of); "grouped" batches examples of similar
# length (transformers' LengthGroupedSampler): less padding; "exact" is "grouped" with widths not rounded
# (--pad_to_multiple_of 1): a new shape for almost every batch;
# "packed" is the packed row; "padfree" a prototype collator (in this file, not in lmkit) that concatenates a batch's
# examples into one row with per-example position_ids, as TRL's padding_free does: no padding, attention within each
# example; "fp32" / "bf16" the padded path in that dtype, whatever --dtype says; "compiled" the packed path with
# --torch_compile (one shape, compiled in the warm-up steps the clock leaves out; inductor's on-disk cache is the
# machine's, warm after a first run).
PATHS = {
    "full": {"sampling": "random", "packing": False},
    "grouped": {"sampling": "group_by_length", "packing": False},
    "exact": {"sampling": "group_by_length", "packing": False, "pad_to_multiple_of": 1},
    "packed": {"sampling": "random", "packing": True},
    "padfree": {"sampling": "random", "packing": False, "padding_free": True},
    "fp32": {"sampling": "random", "packing": False, "bf16": False},
    "bf16": {"sampling": "random", "packing": False, "bf16": True},
    "compiled": {"sampling": "random", "packing": True, "torch_compile": True},
}
PATH_LABELS = {
    "full": "padded (packing false)",
    "grouped": "length-grouped batches",
    "exact": "length-grouped, exact widths",
    "packed": "packed (packing true)",
    "padfree": "padding-free batches (proto)",
    "fp32": "padded, fp32 (no autocast)",
    "bf16": "padded, bf16 autocast",
    "compiled": "packed + --torch_compile",
}


# ---------------------------------------------------------------------------------------------------------------
# Child: one fine-tuning run
# ---------------------------------------------------------------------------------------------------------------


class CountingCollator:
    """Wraps a collator; records the loss-bearing tokens of every batch it builds, in the order it builds them."""

    def __init__(self, collator, shifted: bool) -> None:
        self.collator, self.shifted, self.counts = collator, shifted, []

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch["labels"] if self.shifted else batch["labels"][..., 1:]  # lmkit's labels are pre-shifted
        self.counts.append(int((labels != IGNORE_INDEX).sum()))
        return batch


def padding_free_collator(features: list[dict]) -> dict:
    """One row holding the batch's examples back to back; position_ids restart at 0 for each example."""
    import torch

    inputs, targets, positions = [], [], []
    for f in features:
        labels = f.get("labels", f["input_ids"])
        inputs += f["input_ids"][:-1]
        targets += labels[1:]  # the last target of an example is its own final token: nothing crosses examples
        positions += list(range(len(f["input_ids"]) - 1))
    batch = {"input_ids": torch.tensor([inputs]), "shift_labels": torch.tensor([targets])}
    return batch | {"labels": batch["shift_labels"], "position_ids": torch.tensor([positions])}


def child(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    packing, lora, lr = spec["packing"], spec["lora"], spec["learning_rate"]
    common = {
        "output_dir": tempfile.mkdtemp(prefix="lmkit-bench-ft-"), "per_device_train_batch_size": spec["batch_size"],
        "per_device_eval_batch_size": spec["batch_size"], "num_train_epochs": 1, "learning_rate": lr,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "optim": "adamw_torch_fused", "bf16": spec["bf16"], "activation_checkpointing": False,
        "torch_compile": spec.get("torch_compile", False),
        "logging_steps": 10**6, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "use_cpu": spec["device"] == "cpu", "seed": 0, "dataloader_num_workers": 0,
    }  # fmt: skip

    if spec["kind"] == "lmkit":
        from transformers import set_seed

        from lmkit.args import DataArguments, LMTrainingArguments
        from lmkit.finetune import apply_lora, load_model, load_tokenizer, sft_collator
        from lmkit.finetune_args import FinetuneArguments
        from lmkit.perf import resolve_attn_implementation
        from lmkit.runtime import configure_allocator
        from lmkit.sft import PROMPT_COMPLETION, build_sft_datasets
        from lmkit.trainer import LMTrainer

        args = LMTrainingArguments(
            **common, train_sampling_strategy=spec.get("sampling", "random"), sample_prompt=None, max_nonfinite_steps=5
        )
        configure_allocator(args)  # the recipe's set-up step (prepare_run): --cpu_allocator_reuse
        tokenizer, _ = load_tokenizer(spec["lmkit_dir"])
        model = load_model(
            spec["lmkit_dir"], attn_implementation=resolve_attn_implementation("auto", args, spec["block_size"])
        )
        # The recipe's data path. Packed runs evaluate packed rows too (the same per-token loss: attention and
        # positions stay per example), so a compiled run sees one shape.
        data_args = DataArguments(
            train_files=[spec["rows"]], validation_files=[spec["eval_rows"]], block_size=spec["block_size"]
        )
        datasets = build_sft_datasets(data_args, tokenizer, packing=packing, seed=0)
        train, evaluation = datasets["train"], datasets["validation"]
        ft_args = FinetuneArguments(
            packing=packing, use_lora=lora, lora_r=16, lora_alpha=32, lora_dropout=0.05,
            **({"pad_to_multiple_of": spec["pad_to_multiple_of"]} if spec.get("pad_to_multiple_of") else {}),
        )  # fmt: skip
        if lora:
            set_seed(0)  # the adapters' initial draw: SFTTrainer calls set_seed(args.seed) just before wrapping
            model = apply_lora(model, ft_args)
        collator = sft_collator(tokenizer.pad_token_id, data_args, ft_args, PROMPT_COMPLETION)
        if spec.get("padding_free"):
            collator = padding_free_collator
        collator = CountingCollator(collator, shifted=True)
        trainer = LMTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
            processing_class=tokenizer,
        )  # fmt: skip
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer, LlamaForCausalLM
        from trl import SFTConfig, SFTTrainer

        def tokenized(path: str) -> Dataset:
            examples = [json.loads(line) for line in Path(path).read_text().splitlines()]
            return Dataset.from_list(
                [
                    {"input_ids": e["input_ids"], "completion_mask": [int(x != IGNORE_INDEX) for x in e["labels"]]}
                    for e in examples
                ]  # fmt: skip
            )

        tokenizer = AutoTokenizer.from_pretrained(spec["llama_dir"])
        model = LlamaForCausalLM.from_pretrained(spec["llama_dir"], dtype=torch.float32)
        args = SFTConfig(
            **common, max_length=spec["block_size"] + 1, packing=packing, completion_only_loss=True,
            dataset_num_proc=None,
        )  # fmt: skip
        peft_config = None
        if lora:
            peft_config = LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
            )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=tokenized(spec["tokens"]), eval_dataset=tokenized(spec["eval_tokens"]),
            processing_class=tokenizer, peft_config=peft_config,
        )  # fmt: skip
        collator = CountingCollator(trainer.data_collator, shifted=False)
        trainer.data_collator = collator

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.t1 = None

        def on_step_end(self, args, state, control, **kwargs):
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            if state.global_step == spec["warmup"]:
                self.t0 = time.perf_counter()
            self.t1 = time.perf_counter()

    clock = Clock()
    trainer.add_callback(clock)
    result = trainer.train()
    steps = result.global_step
    if steps <= spec["warmup"]:
        raise RuntimeError(f"only {steps} steps: fewer than --warmup {spec['warmup']} + 1; use more --rows")
    timed_tokens = sum(collator.counts[spec["warmup"] : steps])
    eval_loss = trainer.evaluate()["eval_loss"]
    return {
        "trained_tokens_per_second": timed_tokens / (clock.t1 - clock.t0),
        "steps": steps,
        "trained_tokens": sum(collator.counts[:steps]),
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "peak_mem_mib": (
            torch.cuda.max_memory_allocated() / 2**20
            if spec["device"] == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent: model, rows, alternating runs, table
# ---------------------------------------------------------------------------------------------------------------


def synth_rows(n: int, seed: int, block_size: int, tokenizer) -> list[dict]:
    """Deterministic prompt/completion rows of varied lengths, each within ``block_size + 1`` tokens."""
    import numpy as np

    from lmkit.args import BUNDLED_CORPUS
    from lmkit.sft import tokenize_example

    text = BUNDLED_CORPUS.read_text(encoding="utf-8")
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    while len(rows) < n:
        # Log-uniform lengths in characters (a BPE token is ~3-4 characters here): short and long examples mixed.
        p_len, c_len = (int(np.exp(rng.uniform(np.log(20), np.log(2.2 * block_size)))) for _ in range(2))
        p_at, c_at = rng.integers(0, len(text) - p_len), rng.integers(0, len(text) - c_len)
        row = {"prompt": "Continue the scene:\n" + text[p_at : p_at + p_len], "completion": text[c_at : c_at + c_len]}
        if len(tokenize_example(row, tokenizer)["input_ids"]) <= block_size + 1:
            rows.append(row)
    return rows


def prepare(work: Path, args: argparse.Namespace) -> dict:
    import torch

    from lmkit import LMConfig, LMForCausalLM
    from lmkit.args import BUNDLED_CORPUS
    from lmkit.hub import to_llama
    from lmkit.sft import tokenize_example
    from lmkit.tokenizer import build_tokenizer

    paragraphs = [p for p in BUNDLED_CORPUS.read_text(encoding="utf-8").split("\n\n") if p]
    tokenizer = build_tokenizer("train", paragraphs, args.vocab_size)
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.block_size + 1, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LMForCausalLM(config)
    paths = {"lmkit_dir": work / "lmkit", "llama_dir": work / "llama"}
    model.save_pretrained(paths["lmkit_dir"])
    to_llama(model).save_pretrained(paths["llama_dir"])
    for path in paths.values():
        tokenizer.save_pretrained(path)

    rows = synth_rows(args.rows + args.eval_rows, 0, args.block_size, tokenizer)
    splits = {"rows": rows[: args.rows], "eval_rows": rows[args.rows :]}
    for name, split in list(splits.items()):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))
        tokens = "tokens" if name == "rows" else "eval_tokens"
        (work / f"{tokens}.jsonl").write_text(
            "".join(json.dumps(tokenize_example(r, tokenizer)) + "\n" for r in split)
        )
        paths[name], paths[tokens] = work / f"{name}.jsonl", work / f"{tokens}.jsonl"
    return {k: str(v) for k, v in paths.items()} | {"num_parameters": model.num_parameters()}


def run_child(spec: dict, script: str = __file__, env: dict | None = None) -> dict:
    """Run ``script --child SPEC`` in a fresh process; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=REPO, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=list(ROWS), default=list(ROWS), help="lmkit vs TRL rows")
    parser.add_argument("--paths", nargs="*", choices=list(PATHS), default=[], help="lmkit SFT paths to compare")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=256, help="longest example: block_size + 1 tokens")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=192, help="training examples (one epoch)")
    parser.add_argument("--eval_rows", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the clock starts")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: peak GPU memory, not RSS")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lmkit_order", default="default", choices=["default", "random"],
                        help="random: lmkit's rows in TRL's order too, so both sides train the same batches")  # fmt: skip
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    work = Path(tempfile.mkdtemp(prefix="lmkit-bench-ft-"))
    base = prepare(work, args) | {
        "block_size": args.block_size, "batch_size": args.batch_size, "warmup": args.warmup,
        "bf16": args.dtype == "bf16", "device": args.device,
    }  # fmt: skip
    runs: dict[str, dict] = {}
    for row in args.only:
        packing, lora, lr = ROWS[row]
        for kind in ("lmkit", "trl"):
            runs[f"{row} {kind}"] = {"kind": kind, "packing": packing, "lora": lora, "learning_rate": lr}
        # Each side's default order: recipes/finetune.py groups unpacked rows by length
        # (lmkit.finetune.default_sft_sampling); TRL's SFTTrainer samples at random.
        grouped = not packing and args.lmkit_order == "default"
        runs[f"{row} lmkit"]["sampling"] = "group_by_length" if grouped else "random"
    if args.paths:
        for path in dict.fromkeys(["full", *args.paths]):
            options = PATHS[path]
            runs[f"{path} path"] = {"kind": "lmkit", "lora": False, "learning_rate": ROWS["full"][2], **options}

    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, run in runs.items():
            results[name].append(run_child({**base, **run, "name": name}))
            got = results[name][-1]
            print(f"repeat {r + 1}/{args.repeats} {name}: {got['trained_tokens_per_second']:.0f} trained tok/s, "
                  f"{got['peak_mem_mib']:.0f} MiB, loss {got['train_loss']:.4f}", file=sys.stderr)  # fmt: skip

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    threads = results[next(iter(results))][0]["threads"]
    machine = f"{cpu_name()}, {threads} threads"
    if args.device == "cuda":
        import torch

        machine = f"{torch.cuda.get_device_name()} ({machine})"
    print(
        f"\nmachine: {machine}; model: {args.num_layers} layers x {args.hidden_size} dims, "
        f"{args.num_heads}/{args.num_kv_heads} heads, vocab {args.vocab_size} ({base['num_parameters']:,} params); "
        f"{args.rows} examples (<= {args.block_size + 1} tokens), micro-batch {args.batch_size}, {args.dtype}, "
        f"1 epoch, clock from step {args.warmup}; median of {args.repeats} alternating repeats"
    )
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    header = (
        f"| {'run':16} | {'steps':>5} | {'trained tok/s':>13} | {'vs TRL':>6} | {memory:>12} | {'vs TRL':>6} "
        f"| {'train loss':>10} | {'eval loss':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in runs:
        tok_s, rss = med(name, "trained_tokens_per_second"), med(name, "peak_mem_mib")
        ref = name.replace(" lmkit", " trl")
        if name.endswith(" lmkit") and ref in results:
            vs_tok, vs_rss = (
                f"{tok_s / med(ref, 'trained_tokens_per_second'):.2f}x",
                f"{rss / med(ref, 'peak_mem_mib'):.2f}x",
            )
        else:
            vs_tok = vs_rss = "-"
        print(
            f"| {name:16} | {results[name][0]['steps']:>5} | {tok_s:>13.0f} | {vs_tok:>6} | {rss:>12.0f} | "
            f"{vs_rss:>6} | {med(name, 'train_loss'):>10.4f} | {med(name, 'eval_loss'):>9.4f} |"
        )
    print("trained tokens: loss-bearing (answer) tokens; TRL rows are stock LlamaForCausalLM with lmkit's weights")
    if args.paths:
        padded = med("full path", "trained_tokens_per_second")
        print("\nlmkit SFT paths (same examples, one epoch each, full fine-tuning):")
        trl = med("full trl", "trained_tokens_per_second") if "full trl" in results else None
        print(
            "| path                         | steps | trained tok/s | vs padded | vs TRL full | train loss | eval loss |"
        )
        print(
            "|------------------------------|-------|---------------|-----------|-------------|------------|-----------|"
        )
        for path in dict.fromkeys(["full", *args.paths]):
            name, tok_s = f"{path} path", med(f"{path} path", "trained_tokens_per_second")
            vs_trl = f"{tok_s / trl:.2f}x" if trl else "-"
            print(
                f"| {PATH_LABELS[path]:28} | {results[name][0]['steps']:>5} | {tok_s:>13.0f} | {tok_s / padded:>8.2f}x "
                f"| {vs_trl:>11} | {med(name, 'train_loss'):>10.4f} | {med(name, 'eval_loss'):>9.4f} |"
            )


if __name__ == "__main__":
    main()
