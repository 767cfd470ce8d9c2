"""DPO training speed and memory: lmkit's PreferenceTrainer vs TRL's DPOTrainer, padded and packed rows.

    python benchmarks/bench_dpo.py
    python benchmarks/bench_dpo.py --hidden_size 512 --num_layers 8 --vocab_size 16000 --steps 20 --repeats 3

Both train the same saved lmkit model (Llama-shaped, tied embeddings, fp32) on the same pairs from the bundled
corpus, tokenized by the same BPE tokenizer, with the same batch (pairs per step), AdamW and learning rate, each run
in a fresh subprocess; runs alternate lmkit / TRL ``--repeats`` times, medians reported. TRL runs with its
defaults for a full fine-tune (the reference is a second model loaded from the same folder and run each step)
except activation checkpointing, which DPOConfig turns on by default and lmkit does not (off in both here, so the
same work is timed); ``--trl_precompute`` makes TRL precompute reference log-probs too. Packed rows: lmkit ``--packing``, TRL
``padding_free=True``.

Reported per run: training pairs/s over the steps after the first two (the reference pass excluded, then shown
on its own: lmkit's one pass before training), and the process's peak RSS (ru_maxrss).

Results, the CPU and each lever alone (``--levers``): benchmarks/README.md, "Preference tuning vs TRL's DPOTrainer".
The speeds swing 2-3x between runs on a shared machine: read the per-pair ratios, not one run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_assets(out: Path, spec: dict) -> None:
    """A saved model + tokenizer and a pairs file: prompt = a line, chosen = the lines that follow, rejected =
    lines from elsewhere."""
    import torch

    from lmkit import LMConfig, LMForCausalLM
    from lmkit.args import BUNDLED_CORPUS
    from lmkit.tokenizer import build_tokenizer

    text = BUNDLED_CORPUS.read_text(encoding="utf-8")
    tok = build_tokenizer("train", [text], vocab_size=spec["vocab_size"])
    torch.manual_seed(0)
    config = LMConfig(vocab_size=len(tok), hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_layers"],
                      num_attention_heads=spec["hidden_size"] // 64, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    LMForCausalLM(config).save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    lines = [line for line in text.splitlines() if line.strip()]
    rng = random.Random(0)
    rows = []
    for _ in range(spec["pairs"]):
        i, j = rng.randrange(len(lines) - 8), rng.randrange(len(lines) - 8)
        n_c, n_r = rng.randint(1, 4), rng.randint(1, 4)
        rows.append({"prompt": lines[i] + "\n", "chosen": "\n".join(lines[i + 1 : i + 1 + n_c]),
                     "rejected": "\n".join(lines[j : j + n_r])})  # fmt: skip
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def child(spec: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import lmkit  # noqa: F401  (registers the model)

    torch.set_num_threads(spec["threads"])
    assets = Path(spec["assets"])
    model_dir = str(assets / "model")
    step_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter())

    common = dict(output_dir=str(assets / f"out-{spec['kind']}"), report_to="none", use_cpu=True, bf16=False,
                  max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"], learning_rate=1e-6,
                  save_strategy="no", eval_strategy="no", logging_steps=10**6, disable_tqdm=True, weight_decay=0.0,
                  warmup_steps=0, lr_scheduler_type="constant", dataloader_num_workers=0)  # fmt: skip
    t0 = time.perf_counter()
    ref_seconds = 0.0
    if spec["kind"] == "lmkit":
        from lmkit.args import LMTrainingArguments
        from lmkit.dpo import (
            PreferenceCollator,
            PreferenceTrainer,
            add_reference_logps,
            build_preference_dataset,
            read_preference_rows,
        )
        from lmkit.dpo_args import PreferenceArguments
        from lmkit.finetune import load_tokenizer
        from lmkit.finetune_args import FinetuneArguments

        tok, _ = load_tokenizer(model_dir)
        rows, _ = read_preference_rows(
            ((str(i), json.loads(line)) for i, line in enumerate(open(assets / "pairs.jsonl"))), "bench"
        )
        data = build_preference_dataset(rows, tok, spec["max_length"])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        # recipes/dpo.py's collator with its default padding
        collator = PreferenceCollator.from_args(tok.pad_token_id, FinetuneArguments(packing=spec["packed"]))
        r0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            data = add_reference_logps(data, model, collator, key="bench", cache_dir=Path(cache), batch_size=16)
        ref_seconds = time.perf_counter() - r0
        args = LMTrainingArguments(**common, peak_flops=1e12)
        trainer = PreferenceTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                                    processing_class=tok, preference_args=PreferenceArguments(),
                                    callbacks=[Clock()])  # fmt: skip
    else:
        from trl import DPOConfig, DPOTrainer

        tok = AutoTokenizer.from_pretrained(model_dir)
        data = load_dataset("json", data_files=str(assets / "pairs.jsonl"), split="train")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = DPOConfig(**common, max_length=spec["max_length"], padding_free=spec["packed"], beta=0.1,
                         precompute_ref_log_probs=spec["trl_precompute"], gradient_checkpointing=False)  # fmt: skip
        r0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        if spec["trl_precompute"]:  # TRL computes its reference pass inside train(): time it apart
            trainer.get_train_dataloader()
            ref_seconds = time.perf_counter() - r0
    trainer.train()
    # The median step, not the span: on a shared machine a load spike in one step should not decide the run.
    durations = [b - a for a, b in zip(step_times[2:], step_times[3:], strict=False)]
    pairs_per_s = spec["batch_size"] / statistics.median(durations)
    return {
        "pairs_per_s": pairs_per_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reference_pass_s": ref_seconds,
        "wall_s": time.perf_counter() - t0,
    }


def levers(spec: dict) -> None:
    """Each lever of lmkit's step alone, in one process, alternated batch by batch (so load drift hits all alike):
    one policy forward + backward per variant on the same pairs, against lmkit's padded step."""
    import torch
    from transformers import AutoModelForCausalLM

    import lmkit  # noqa: F401  (registers the model)
    from lmkit.dpo import (
        IGNORE_INDEX,
        PreferenceCollator,
        build_preference_dataset,
        enable_token_logps,
        read_preference_rows,
        sequence_logps,
    )
    from lmkit.finetune import load_tokenizer

    torch.set_num_threads(spec["threads"])
    assets = Path(spec["assets"])
    tok, _ = load_tokenizer(str(assets / "model"))
    rows, _ = read_preference_rows(
        ((str(i), json.loads(line)) for i, line in enumerate(open(assets / "pairs.jsonl"))), "bench"
    )
    data = build_preference_dataset(rows, tok, spec["max_length"])
    model = enable_token_logps(AutoModelForCausalLM.from_pretrained(str(assets / "model"), dtype=torch.float32))
    padded, packed = PreferenceCollator(tok.pad_token_id), PreferenceCollator(tok.pad_token_id, packing=True)

    def every_position(batch: dict) -> dict:  # TRL on CPU: the LM head over every (non-pad) position
        valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        return {**batch, "targets": torch.where(valid, batch["input_ids"].roll(-1, 1), IGNORE_INDEX)}

    def no_mask(batch: dict) -> dict:  # right padding under causal attention: real tokens never see the pads
        return {k: v for k, v in batch.items() if k != "attention_mask"}

    def step(batch: dict, reference: bool = False) -> None:
        if reference:  # a second forward without gradients, as TRL runs its reference model each step
            with torch.no_grad():
                sequence_logps(model, batch)
        sums, _ = sequence_logps(model, batch)
        sums.sum().backward()

    variants = {
        "lmkit padded (answer positions scored, reference precomputed)": lambda f: (padded(f), False),
        "+ every position scored (TRL's CPU head)": lambda f: (every_position(padded(f)), False),
        "+ reference forward each step (TRL's default)": lambda f: (padded(f), True),
        "padded without attention mask": lambda f: (no_mask(padded(f)), False),
        "packed (lmkit --packing)": lambda f: (packed(f), False),
    }
    size = spec["batch_size"]
    features = [[data[i] for i in range(s, s + size)] for s in range(0, len(data) - size + 1, size)]
    features = features[: spec["steps"]]
    seconds = dict.fromkeys(variants, 0.0)
    for i, f in enumerate(features):
        for name, make in variants.items():
            batch, reference = make(f)
            t = time.perf_counter()
            step(batch, reference)
            if i > 0:  # the first batch warms up
                seconds[name] += time.perf_counter() - t
            model.zero_grad(set_to_none=True)
    base = seconds[next(iter(variants))]
    print(f"levers: {len(features) - 1} batches of {size} pairs, alternated; speed relative to lmkit padded")
    print("| variant | seconds | relative speed |\n|---|---|---|")
    for name, sec in seconds.items():
        print(f"| {name} | {sec:.1f} | {base / sec:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl_precompute", action="store_true")
    parser.add_argument("--levers", action="store_true", help="time each lever of lmkit's step alone, in-process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        print("RESULT " + json.dumps(child(json.loads(cli.child))))
        return
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    spec = {k: v for k, v in vars(cli).items() if k != "child"}
    with tempfile.TemporaryDirectory() as tmp:
        spec["assets"] = tmp
        make_assets(Path(tmp), spec)
        if cli.levers:
            print(cpu)
            return levers(spec)
        results: dict[tuple[str, bool], list[dict]] = {}
        for _ in range(cli.repeats):
            for packed in (False, True):
                for kind in ("lmkit", "trl"):  # alternated, so drift on a shared machine hits both
                    run_spec = {**spec, "kind": kind, "packed": packed}
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(run_spec)],
                                          capture_output=True, text=True)  # fmt: skip
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        sys.exit(f"{kind} packed={packed} failed:\n{proc.stderr[-3000:]}")
                    results.setdefault((kind, packed), []).append(json.loads(line[7:]))
    print(f"{cpu}; {cli.threads} threads; vocab {cli.vocab_size}, hidden {cli.hidden_size}, {cli.num_layers} layers; "
          f"{cli.batch_size} pairs/step, {cli.steps} steps; medians of {cli.repeats}")  # fmt: skip
    print(
        "| rows | lmkit pairs/s | TRL pairs/s | speed-up | lmkit peak RSS MiB | TRL peak RSS MiB | RSS ratio | "
        "lmkit reference pass s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for packed in (False, True):
        med = {k: {m: statistics.median(r[m] for r in results[(k, packed)]) for m in results[(k, packed)][0]}
               for k in ("lmkit", "trl")}  # fmt: skip
        lm, trl = med["lmkit"], med["trl"]
        # Each lmkit run against the TRL run right after it (the nearest in load), then the median of those ratios.
        ratios = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(*(results[(k, packed)] for k in ("lmkit", "trl")),
                                                                         strict=True)]  # fmt: skip
        print(f"| {'packed' if packed else 'padded'} | {lm['pairs_per_s']:.1f} | {trl['pairs_per_s']:.1f} | "
              f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}) | {lm['peak_rss_mib']:.0f} | "
              f"{trl['peak_rss_mib']:.0f} | {lm['peak_rss_mib'] / trl['peak_rss_mib']:.2f} | "
              f"{lm['reference_pass_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
