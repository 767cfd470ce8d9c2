"""Text generation from a trained model: sampling options, streaming to the terminal, left-padded batches.

Decoding itself is transformers' `generate` with the KV cache on; this module only turns lmkit's flags into a
`GenerationConfig` and handles prompts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer, set_seed

from lmkit.errors import LMKitError
from lmkit.eval_args import GenerationArguments
from lmkit.hub import load_checkpoint

logger = logging.getLogger(__name__)


def generation_config(
    args: GenerationArguments, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> GenerationConfig:
    """Greedy when ``temperature`` is 0, otherwise sampling with temperature, top-k and top-p; always cached.

    Generation stops at the tokenizer's EOS, or at any stop token ``model``'s own generation config lists (a chat
    model fine-tuned by lmkit also stops at its end-of-turn marker)."""
    sample = args.temperature > 0
    stops = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_k=args.top_k if sample else None,
        top_p=args.top_p if sample else None,
        repetition_penalty=args.repetition_penalty,
        use_cache=True,
        eos_token_id=stops if stops is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def fit_new_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> int:
    """``max_new_tokens``, or fewer so the longest prompt and its continuation fit the model's positions (past them
    a rotary model meets positions it never trained on, samples garbage, and transformers warns); 0 when the prompt
    fills them. A cut is logged."""
    room = getattr(model.config, "max_position_embeddings", None)
    if room is None:
        return max_new_tokens
    longest = int(encode_prompts(prompts, tokenizer)["attention_mask"].sum(dim=1).max())
    fitted = max(0, min(max_new_tokens, room - longest))
    if fitted < max_new_tokens:
        logger.warning(
            "--max_new_tokens %d: the model has %d positions and the longest prompt %d tokens: generating at most %d",
            max_new_tokens, room, longest, fitted,
        )  # fmt: skip
    return fitted


def chat_prompts(prompts: list[str], tokenizer: PreTrainedTokenizerBase, model: str) -> list[str]:
    """Each prompt as one user turn in the tokenizer's chat template, ending where the assistant's answer starts
    (``add_generation_prompt``): the form a chat-tuned model was trained on. ``model`` names it in the error."""
    if not tokenizer.chat_template:
        raise LMKitError(f"--chat: {model} has no chat template (it was not fine-tuned on chats); drop --chat")
    turns = ([{"role": "user", "content": prompt}] for prompt in prompts)
    return [tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) for turn in turns]


def encode_prompts(prompts: list[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Token ids and attention mask of ``prompts``, left-padded so every prompt ends where generation starts.

    An empty prompt starts from the BOS token (the document boundary the model saw in training).
    """
    texts = [p if p else tokenizer.bos_token or tokenizer.eos_token for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: GenerationConfig,
    seed: int | None = None,
    stream: bool = False,
) -> list[str]:
    """Continue each prompt; return only the generated text (special tokens dropped).

    With ``stream`` (one prompt only), the prompt and then each new piece of text are printed to stdout as the
    tokens are produced, through transformers' `TextStreamer`.
    """
    if stream and len(prompts) != 1:
        raise ValueError("streaming prints one prompt at a time")
    if seed is not None:
        set_seed(seed)
    inputs = encode_prompts(prompts, tokenizer).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True) if stream else None
    out = model.generate(**inputs, generation_config=config, streamer=streamer)  # (B, T_prompt + new)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@contextlib.contextmanager
def _zero3_off() -> Iterator[None]:
    """Load and sample a whole model on one rank after a ZeRO-3 run. While the run's DeepSpeed config is alive,
    transformers' `from_pretrained` partitions the new model with `zero.Init`, and `generate` syncs every decoding
    step across ranks (``synced_gpus``): collectives that the other ranks, already finished, never join. Both consult
    only this process-wide reference, so hide it for the duration (transformers has no scoped switch:
    `unset_hf_deepspeed_config` is permanent)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def sample_saved_model(model_dir: str, prompt: str, max_new_tokens: int) -> str:
    """``prompt`` and a sampled continuation (temperature 0.8, top-k 50) from the model saved in ``model_dir``.

    A training recipe's closing sample reloads what it saved: a consolidated model even after ZeRO-3 / FSDP, and a
    check that the save loads.
    """
    with _zero3_off():
        model, tokenizer = load_checkpoint(model_dir)
        max_new_tokens = fit_new_tokens(model, tokenizer, [prompt], max_new_tokens)
        if max_new_tokens < 1:
            return prompt
        sampling = GenerationArguments(prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50)
        (completion,) = generate(model, tokenizer, [prompt], generation_config(sampling, tokenizer, model))
    return prompt + completion
