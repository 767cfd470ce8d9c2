"""Generate text with a trained model: one prompt streamed to the terminal, or a file of prompts in batches.

    python recipes/generate.py --model outputs/pretrain --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8
    python recipes/generate.py --model outputs/pretrain --prompt "ROMEO:" --temperature 0      # greedy
    python recipes/generate.py --model outputs/pretrain --prompts_file prompts.txt --output_file out.jsonl

--chat renders each prompt as a user turn with the model's chat template (a model fine-tuned on chats), and
generation stops at the model's own stop tokens (its end-of-turn marker too).
Sampling: --temperature (0 = greedy), --top_k, --top_p, --repetition_penalty, --max_new_tokens, --seed (the same
seed gives the same text). --prompts_file holds one prompt per line; they run --batch_size at a time, left-padded,
and each completion is printed (and written as JSON lines to --output_file when given). The KV cache is on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmkit.args import parse_args
from lmkit.errors import LMKitError, main_entry
from lmkit.eval_args import CheckpointArguments, GenerationArguments
from lmkit.generation import chat_prompts, fit_new_tokens, generate, generation_config
from lmkit.hub import check_model_dir, load_checkpoint
from lmkit.runtime import configure_threads, setup_tool_logging

logger = logging.getLogger("lmkit.generate")


@main_entry
def main(argv: list[str] | None = None) -> list[str]:
    # -- setup ------------------------------------------------------------------------------------------------
    ckpt: CheckpointArguments
    gen_args: GenerationArguments
    ckpt, gen_args = parse_args((CheckpointArguments, GenerationArguments), argv=argv)
    setup_tool_logging(logging.WARNING)
    configure_threads(ckpt.num_threads)
    check_model_dir(ckpt.model)
    prompts = [gen_args.prompt] if gen_args.prompt is not None else read_prompts(gen_args.prompts_file)

    # -- model ------------------------------------------------------------------------------------------------
    model, tokenizer = load_checkpoint(ckpt.model, ckpt.dtype, ckpt.trust_remote_code)
    config = generation_config(gen_args, tokenizer, model)
    inputs = chat_prompts(prompts, tokenizer, ckpt.model) if gen_args.chat else prompts
    config.max_new_tokens = fit_new_tokens(model, tokenizer, inputs, gen_args.max_new_tokens)
    if config.max_new_tokens < 1:
        raise LMKitError(
            f"--max_new_tokens: the longest prompt fills all {model.config.max_position_embeddings} positions of "
            f"{ckpt.model}; shorten it"
        )

    # -- generate ---------------------------------------------------------------------------------------------
    if gen_args.prompt is not None:
        completions = generate(model, tokenizer, inputs, config, seed=gen_args.seed, stream=True)
        return completions
    completions = []
    for start in range(0, len(prompts), gen_args.batch_size):
        batch = inputs[start : start + gen_args.batch_size]
        # One seed per batch position keeps a prompt's sample independent of how many batches came before it.
        completions += generate(model, tokenizer, batch, config, seed=gen_args.seed + start)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        print(f"===== {i}: {prompt}\n{prompt}{completion}\n")
    if gen_args.output_file:
        with open(gen_args.output_file, "w", encoding="utf-8") as f:
            for prompt, completion in zip(prompts, completions, strict=True):
                f.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
    return completions


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise LMKitError(f"--prompts_file {path}: no such file")
    try:
        prompts = [line.rstrip("\r\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise LMKitError(f"--prompts_file {path}: not UTF-8 text") from err
    if not prompts:
        raise LMKitError(f"--prompts_file {path}: no prompts (the file is empty)")
    return prompts


if __name__ == "__main__":
    main()
