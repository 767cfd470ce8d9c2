"""Evaluate a trained model on held-out text: loss, perplexity and bits per byte.

    python recipes/evaluate.py --model outputs/pretrain --files data/heldout.txt
    python recipes/evaluate.py --model outputs/pretrain --files 'heldout/*.jsonl' --context 128 --stride 64

Without --stride the text is packed into non-overlapping blocks of --context + 1 tokens exactly as training packs
its validation split, so the loss equals the trainer's eval_loss for the same text and --context (= --block_size).
With --stride every token is scored once with at least context - stride tokens before it (sliding window).
Prints a table and writes the numbers as JSON (--output_file, default <model>/evaluation.json), where
recipes/publish.py picks them up for the model card.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

# This script shares its name with the `evaluate` package, and Python puts the script's folder first on sys.path:
# drop that folder so `import evaluate` (inside lmkit.evaluation) finds the package, not this file.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from lmkit.args import DataArguments, parse_args  # noqa: E402
from lmkit.data import load_files, resolve_data_files  # noqa: E402
from lmkit.errors import LMKitError, main_entry  # noqa: E402
from lmkit.eval_args import CheckpointArguments, EvaluationArguments  # noqa: E402
from lmkit.evaluation import evaluate_stream, token_stream  # noqa: E402
from lmkit.hub import check_model_dir, load_checkpoint, load_config  # noqa: E402
from lmkit.runtime import configure_threads, setup_tool_logging  # noqa: E402

logger = logging.getLogger("lmkit.evaluate")


@main_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    # -- setup ------------------------------------------------------------------------------------------------
    ckpt: CheckpointArguments
    eval_args: EvaluationArguments
    ckpt, eval_args = parse_args((CheckpointArguments, EvaluationArguments), argv=argv)
    setup_tool_logging(logging.INFO)
    threads = configure_threads(ckpt.num_threads)
    # Everything that can be checked without the weights is checked first, so bad input fails fast.
    model_dir = check_model_dir(ckpt.model)
    files = resolve_data_files(eval_args.files, "--files")
    max_positions = load_config(ckpt.model, ckpt.trust_remote_code).max_position_embeddings
    context = eval_args.context or max_positions
    if context > max_positions:
        raise LMKitError(f"--context {context} exceeds the model's max_position_embeddings {max_positions}")
    if eval_args.stride is not None and eval_args.stride > context:
        raise LMKitError(f"--stride {eval_args.stride} is larger than the context {context} (see --context)")

    # -- model and data ---------------------------------------------------------------------------------------
    model, tokenizer = load_checkpoint(ckpt.model, ckpt.dtype, ckpt.trust_remote_code)
    data_args = DataArguments(text_column=eval_args.text_column, sample_by=eval_args.sample_by)
    docs = load_files(files, "--files", data_args)
    stream = token_stream(docs["text"], tokenizer)
    logger.info("%d documents, %s tokens from %d file(s); context %d, stride %s; threads %s", len(docs),
                f"{len(stream):,}", len(files), context, eval_args.stride, threads)  # fmt: skip

    # -- evaluate ---------------------------------------------------------------------------------------------
    start = time.perf_counter()
    results = evaluate_stream(model, tokenizer, stream, context, eval_args.stride, eval_args.batch_size)
    results.update(model=ckpt.model, files=[str(f) for f in files], seconds=round(time.perf_counter() - start, 2))

    # -- report -----------------------------------------------------------------------------------------------
    print(format_table(results))
    out = Path(eval_args.output_file) if eval_args.output_file else (model_dir or Path(".")) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", out)
    return results


def format_table(results: dict) -> str:
    rows = [
        ("loss (nats/token)", f"{results['loss']:.4f}"),
        ("perplexity", f"{results['perplexity']:.3f}"),
        ("bits per byte", f"{results['bits_per_byte']:.4f}"),
        ("tokens scored", f"{results['tokens']:,}"),
        ("bytes scored", f"{results['bytes']:,}"),
        ("windows", f"{results['windows']:,} (context {results['context']}, stride {results['stride'] or 'none'})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    main()
