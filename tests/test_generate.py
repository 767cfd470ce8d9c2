"""Generation: KV cache changes nothing, left padding changes nothing, seeds reproduce, streaming, pipeline."""

import json

import pytest
import torch
from _recipes import load_recipe
from _tiny_checkpoint import make_checkpoint
from transformers import pipeline

from lmkit.eval_args import GenerationArguments
from lmkit.generation import encode_prompts, generate, generation_config

PROMPTS = ["ROMEO:", "First Citizen: Before we", "O"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model, tok = make_checkpoint(path, run_files=False)
    return path, model, tok


def greedy(max_new_tokens: int = 24) -> GenerationArguments:
    return GenerationArguments(prompt="x", temperature=0, max_new_tokens=max_new_tokens)


def test_cached_and_uncached_greedy_outputs_are_identical(ckpt):
    _, model, tok = ckpt
    inputs = encode_prompts(PROMPTS, tok)  # left-padded batch: the cache must also respect the padding
    config = generation_config(greedy(), tok)
    with torch.no_grad():
        cached = model.generate(**inputs, generation_config=config)
        config.use_cache = False
        uncached = model.generate(**inputs, generation_config=config)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 24
    assert len({tuple(row[-24:].tolist()) for row in cached}) > 1  # not a degenerate constant output


def test_left_padded_batch_equals_prompts_one_at_a_time(ckpt):
    _, model, tok = ckpt
    inputs = encode_prompts(PROMPTS, tok)
    assert inputs["attention_mask"][2].tolist()[0] == 0 and inputs["input_ids"][2, -1] == tok.convert_tokens_to_ids(
        "O"
    )
    config = generation_config(greedy(), tok)
    batched = generate(model, tok, PROMPTS, config)
    single = [generate(model, tok, [p], config)[0] for p in PROMPTS]
    assert batched == single


def test_sampling_options_and_seed(ckpt):
    _, model, tok = ckpt
    args = GenerationArguments(
        prompt="x", temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=16
    )
    config = generation_config(args, tok)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 20, 0.9)
    assert config.repetition_penalty == 1.3 and config.use_cache and config.max_new_tokens == 16
    first = generate(model, tok, PROMPTS, config, seed=3)
    assert generate(model, tok, PROMPTS, config, seed=3) == first
    assert generate(model, tok, PROMPTS, config, seed=4) != first
    assert generation_config(greedy(), tok).do_sample is False


def test_streaming_prints_prompt_and_completion(ckpt, capsys):
    _, model, tok = ckpt
    completion = generate(model, tok, ["ROMEO:"], generation_config(greedy(), tok), stream=True)[0]
    assert capsys.readouterr().out == "ROMEO:" + completion + "\n"


def test_text_generation_pipeline_loads_an_lmkit_checkpoint(ckpt):
    path, model, tok = ckpt
    generator = pipeline("text-generation", model=str(path))
    out = generator("ROMEO:", max_new_tokens=24, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == generate(model, tok, ["ROMEO:"], generation_config(greedy(), tok))[0]


def test_recipe_prompts_file_and_streamed_prompt(ckpt, tmp_path, capsys):
    path, model, tok = ckpt
    prompts_file, out_file = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts_file.write_text("\n".join(PROMPTS[:1] + [""] + PROMPTS[1:]) + "\n")  # blank lines are skipped
    recipe = load_recipe("generate")
    argv = ["--model", str(path), "--temperature", "0", "--max_new_tokens", "12", "--batch_size", "2"]
    completions = recipe.main([*argv, "--prompts_file", str(prompts_file), "--output_file", str(out_file)])
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["completion"] for r in rows] == completions
    assert completions == generate(model, tok, PROMPTS, generation_config(greedy(max_new_tokens=12), tok))
    capsys.readouterr()
    streamed = recipe.main([*argv, "--prompt", "ROMEO:"])
    assert capsys.readouterr().out == "ROMEO:" + streamed[0] + "\n" and streamed[0] == completions[0]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "exactly one of --prompt or --prompts_file"),
        (["--prompt", "a", "--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--prompts_file", "EMPTY"], "no prompts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys, extra, expected):
    path, _, _ = ckpt
    (tmp_path / "empty.txt").write_text("\n\n")
    extra = [str(tmp_path / "empty.txt") if e == "EMPTY" else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("generate").main(["--model", str(path), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_closing_sample_loads_whole_after_zero3_and_stays_within_the_positions(tmp_path, monkeypatch):
    """The pretraining recipe's closing sample runs on rank 0 after a ZeRO-3 run, whose DeepSpeed config is still
    alive: the load must not partition the model (`zero.Init` is a collective the finished ranks never join; here, with
    no process group, it fails at once). The sample stops at the model's 64 positions, however many tokens were asked."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from lmkit.generation import sample_saved_model

    _, tok = make_checkpoint(tmp_path / "model", run_files=False)  # max_position_embeddings 64
    run_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    from lmkit import generation

    asked = []
    real_generate = generation.generate
    monkeypatch.setattr(
        generation, "generate", lambda m, t, p, cfg: asked.append(cfg.max_new_tokens) or real_generate(m, t, p, cfg)
    )
    torch.manual_seed(0)
    sample = sample_saved_model(str(tmp_path / "model"), "ROMEO:", 500)
    assert sample.startswith("ROMEO:") and len(tok(sample).input_ids) <= 64
    assert asked == [64 - len(tok("ROMEO:").input_ids)] == [58]  # the char tokenizer: 6 prompt tokens
    assert is_deepspeed_zero3_enabled() and run_config.is_zero3()  # the run's config is back in force


TURN = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"


def test_chat_prompts_are_user_turns_and_stop_at_the_models_stop_tokens(tmp_path, capsys):
    """generate.py --chat: each prompt becomes a user turn in the model's chat template, the answer starts after
    it, and decoding stops at any stop token in the model's generation config (here a second one, as a chat model
    fine-tuned by lmkit lists its end-of-turn marker), not only at the tokenizer's EOS."""
    model, tok = make_checkpoint(tmp_path / "chat", run_files=False)
    tok.chat_template = TURN
    tok.save_pretrained(tmp_path / "chat")
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "USER: Hi\nASSISTANT:"
    ids = encode_prompts([rendered], tok)
    with torch.no_grad():  # the greedy answer's third token becomes the model's extra stop token
        free = model.generate(**ids, generation_config=generation_config(greedy(), tok))[
            0, ids["input_ids"].shape[1] :
        ]
    stop = int(free[2])
    assert stop != tok.eos_token_id and int(free[0]) != stop and int(free[1]) != stop
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    model.save_pretrained(tmp_path / "chat")

    out = load_recipe("generate").main(["--model", str(tmp_path / "chat"), "--prompts_file", str(_prompts(tmp_path)),
                                        "--chat", "true", "--temperature", "0", "--max_new_tokens", "24"])  # fmt: skip
    # up to and with the stop token (a chat model's marker is a special token, dropped from the text; this is not)
    assert len(free) == 24 and out == [tok.decode(free[:3], skip_special_tokens=True)]
    assert f"===== 0: Hi\nHi{out[0]}" in capsys.readouterr().out  # printed with the user's prompt
    bare = tmp_path / "bare"
    make_checkpoint(bare, run_files=False)
    with pytest.raises(SystemExit):
        load_recipe("generate").main(["--model", str(bare), "--prompt", "Hi", "--chat", "true"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lmkit: error: --chat: {bare} has no chat template (it was not fine-tuned on chats); drop --chat"
    )


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hi\n")
    return path


def test_generate_stops_at_the_models_positions(ckpt, capsys, caplog):
    """generate.py asked for more tokens than the 64-position model has room for after the prompt generates only
    that many, says so, and a prompt that fills every position is one line."""
    path, model, tok = ckpt
    out = load_recipe("generate").main(["--model", str(path), "--prompt", "ROMEO:", "--max_new_tokens", "500",
                                        "--temperature", "0", "--top_k", "0"])  # fmt: skip
    with torch.no_grad():
        ids = encode_prompts(["ROMEO:"], tok)
        full = model.generate(**ids, generation_config=generation_config(greedy(58), tok))
    assert out == [tok.decode(full[0, 6:], skip_special_tokens=True)]
    said = "--max_new_tokens 500: the model has 64 positions and the longest prompt 6 tokens: generating at most 58"
    assert said in caplog.messages
    capsys.readouterr()
    with pytest.raises(SystemExit):
        load_recipe("generate").main(["--model", str(path), "--prompt", "a" * 64])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lmkit: error: --max_new_tokens: the longest prompt fills all 64 positions of {path}; shorten it"
    )
