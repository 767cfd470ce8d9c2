"""Tokenize once: recipes/preprocess.py against run_clm's ``map(tokenize) + group_texts``, side by side.

    python benchmarks/bench_preprocess.py --sizes_mb 10 100 --workers 2 --repeats 3
    python benchmarks/bench_preprocess.py --sizes_mb 300 --no_reference   # peak RSS on a larger corpus

For each corpus size (tinyshakespeare repeated, one document a line as run_clm reads .txt), in fresh processes and
fresh caches: preprocess's wall time (each side's clock starts after its module imports: run_clm's inline reference
imports datasets and transformers' tokenizer only, while the recipe also imports its argument and training modules;
the whole commands, imports included, are timed and compared too), tokens/s, CPU seconds (all processes) and peak RSS (the main process and the
largest worker), then the reference at the same number of processes and the ratios (``--repeats``: alternated
pairs, median ratio; tokens per CPU second is the ratio the load of other processes sways least); last, the wall
time of a 1-step pretrain on each preprocessed size (start-up to the first step and the save: it should not grow
with the corpus).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "lmkit" / "corpus" / "tinyshakespeare.txt"

# Peak anonymous memory of the main process, sampled: ru_maxrss also counts the pages of memory-mapped Arrow files
# that were read (page cache, which the kernel takes back), so it grows with the corpus even when the heap does not.
SAMPLER = r"""
import threading, time
peak_anon_kb = [0]
def _sample():
    while True:
        with open("/proc/self/status") as status:
            for ln in status:
                if ln.startswith("RssAnon:"):
                    peak_anon_kb[0] = max(peak_anon_kb[0], int(ln.split()[1]))
        time.sleep(0.05)
threading.Thread(target=_sample, daemon=True).start()
"""

# run_clm.py (transformers examples), as it tokenizes and groups: the reference, kept inline on purpose.
REFERENCE = r"""
import json, resource, sys, time
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer
corpus, tokenizer_dir, cache, workers, block_size = sys.argv[1:6]
workers, block_size = int(workers), int(block_size)
t0 = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
raw = load_dataset("text", data_files={"train": corpus}, cache_dir=cache)
def tokenize_function(examples):
    return tokenizer(examples["text"])
tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=["text"])
def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    return {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
n = len(grouped["train"]) * block_size
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "tokens": n,
      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
      "anon_mb": peak_anon_kb[0] / 1024,
      "cpu_s": sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                           resource.RUSAGE_CHILDREN)))}))
"""

OURS = r"""
import json, resource, sys, time
sys.argv = [sys.argv[0], *sys.argv[1:]]
import runpy
recipe = runpy.run_path(sys.argv.pop(1))  # the recipe's imports, outside the clock as run_clm's are
t0 = time.perf_counter()
manifest = recipe["main"](sys.argv[1:])
n = sum(s["tokens"] for s in manifest["splits"].values())
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "tokens": n,
      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
      "anon_mb": peak_anon_kb[0] / 1024,
      "cpu_s": sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                           resource.RUSAGE_CHILDREN)))}))
"""


def run(code: str, *args: str) -> dict:
    """One side in a fresh process. ``seconds``: its own clock, from the end of its module imports to the end of
    its data work; ``command_s``: the whole command as the user waits for it, interpreter start and imports too."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SAMPLER + code, *map(str, args)], capture_output=True, text=True)
    command_s = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return json.loads(line[len("RESULT ") :]) | {"command_s": command_s}


def make_corpus(path: Path, megabytes: int) -> None:
    text = SHAKESPEARE.read_bytes()
    with path.open("wb") as f:
        for _ in range(-(-megabytes * 2**20 // len(text))):
            f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="alternated pairs per size (the ratio is their median)")
    parser.add_argument("--no_reference", action="store_true", help="preprocess only (its RSS on large corpora)")
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    from lmkit.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("train", SHAKESPEARE.read_text().split("\n\n"), 8192)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    print(f"cpu: {_cpu()}; workers {opts.workers}; block_size {opts.block_size}; BPE vocab {len(tokenizer)}")
    first_step = {}
    for mb in opts.sizes_mb:
        corpus = tmp / f"corpus-{mb}.txt"
        make_corpus(corpus, mb)
        out = tmp / f"tok-{mb}"
        ratios, cpu_ratios, command_ratios = [], [], []
        for rep in range(opts.repeats):  # fresh output and caches each time; ours then the reference, alternated
            shutil.rmtree(out, ignore_errors=True)
            flags = ["--train_files", corpus, "--tokenizer", tmp / "tokenizer", "--block_size", opts.block_size,
                     "--sample_by", "line", "--preprocessing_num_workers", opts.workers, "--cache_dir",
                     tmp / f"c-{mb}-{rep}", "--output_dir", out,
                     "--max_position_embeddings", opts.block_size]  # fmt: skip
            ours = run(OURS, REPO / "recipes" / "preprocess.py", *flags)
            shutil.rmtree(tmp / f"c-{mb}-{rep}", ignore_errors=True)
            ours_tps = ours["tokens"] / ours["seconds"]
            line = (f"{mb} MB: preprocess {ours['seconds']:.1f} s, {ours_tps:,.0f} tokens/s, peak RSS "
                    f"{ours['rss_mb']:.0f} MB (anonymous {ours['anon_mb']:.0f} MB; "
                    f"largest worker {ours['child_rss_mb']:.0f} MB), "
                    f"{ours['cpu_s']:.1f} CPU s")  # fmt: skip
            if not opts.no_reference:
                ref = run(REFERENCE, corpus, tmp / "tokenizer", tmp / f"r-{mb}-{rep}", opts.workers, opts.block_size)
                shutil.rmtree(tmp / f"r-{mb}-{rep}", ignore_errors=True)
                ref_tps = ref["tokens"] / ref["seconds"]
                ratios.append(ours_tps / ref_tps)
                command_ratios.append((ours["tokens"] / ours["command_s"]) / (ref["tokens"] / ref["command_s"]))
                cpu_ratios.append((ours["tokens"] / ours["cpu_s"]) / (ref["tokens"] / ref["cpu_s"]))
                line += (f" | run_clm {ref['seconds']:.1f} s, {ref_tps:,.0f} tokens/s, peak RSS {ref['rss_mb']:.0f} MB "
                         f"(anonymous {ref['anon_mb']:.0f} MB; worker {ref['child_rss_mb']:.0f} MB), "
                         f"{ref['cpu_s']:.1f} CPU s | ratio {ratios[-1]:.2f}x, "
                         f"per CPU second {cpu_ratios[-1]:.2f}x, whole commands ({ours['command_s']:.1f} s vs "
                         f"{ref['command_s']:.1f} s) {command_ratios[-1]:.2f}x")  # fmt: skip
            print(line, flush=True)
        if ratios:
            print(f"{mb} MB: median ratio {statistics.median(ratios):.2f}x of {', '.join(f'{r:.2f}' for r in ratios)}; "
                  f"tokens per CPU second {statistics.median(cpu_ratios):.2f}x; whole commands, imports included, "
                  f"{statistics.median(command_ratios):.2f}x")  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain.py"), "--tokenized_dataset", str(out),
                        "--vocab_size", "8192", "--hidden_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
                        "--max_position_embeddings", str(opts.block_size), "--per_device_train_batch_size", "1",
                        "--max_steps", "1", "--eval_strategy", "no", "--eval_on_start", "false", "--report_to",
                        "none", "--sample_prompt", "", "--output_dir", str(tmp / f"run-{mb}")],
                       check=True, capture_output=True)  # fmt: skip
        first_step[mb] = time.perf_counter() - t0
        shutil.rmtree(tmp / f"run-{mb}", ignore_errors=True)
        print(
            f"{mb} MB: 1-step pretrain on the preprocessed corpus (start-up, first step, save) {first_step[mb]:.1f} s"
        )
        corpus.unlink()
    print(
        f"(max RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; files in {tmp})"
    )


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


if __name__ == "__main__":
    main()
