"""SFT data: format detection, row checks that name the line, loss masks, chat templates, packing."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from lmkit import LMForCausalLM
from lmkit.collator import IGNORE_INDEX, CausalLMCollator
from lmkit.errors import LMKitError
from lmkit.packing import pack_examples
from lmkit.sft import (
    CHAT,
    PROMPT_COMPLETION,
    TEXT,
    SFTStream,
    build_sft_dataset,
    build_sft_datasets,
    detect_format,
    end_of_turn_token,
    read_sft_rows,
    resolve_chat_template,
    tokenize_example,
)
from lmkit.tokenizer import build_tokenizer

X = IGNORE_INDEX


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared


@pytest.fixture(scope="module")
def tok():
    """Char tokenizer: '\\n'=0, ' '=1, ':'=2, 'a'..'z'=3..28, eos=29, pad=30, unk=31; ChatML markers 32, 33."""
    tokenizer = build_tokenizer("char", ["abcdefghijklmnopqrstuvwxyz\n: "])
    template, markers = resolve_chat_template(None, tokenizer)
    assert markers == ["<|im_start|>", "<|im_end|>"]  # the default template's markers are new tokens
    tokenizer.add_special_tokens({"extra_special_tokens": markers}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- masks ------------------------------------------------------------------------------------------------------


def test_prompt_completion_learns_completion_and_eos(tok):
    example = tokenize_example({"prompt": "ab", "completion": "c"}, tok)
    assert example == {"input_ids": [3, 4, 5, 29], "labels": [X, X, 5, 29]}
    assert tokenize_example({"prompt": "ab", "completion": "c"}, tok, train_on_prompt=True)["labels"] == [3, 4, 5, 29]


def test_chat_loss_mask_literal(tok):
    """'<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nyo<|im_end|>\\n' + EOS, through the collator."""
    example = tokenize_example(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, tok
    )
    batch = CausalLMCollator(pad_token_id=tok.pad_token_id)([example])
    #          <s>  u   s   e  r  \n  h   i  </s> \n <s>  a   s   s   i   s   t   a   n   t  \n  y   o  </s> \n
    expected_inputs = [32, 23, 21, 7, 20, 0, 10, 11, 33, 0, 32, 3, 21, 21, 11, 21, 22, 3, 16, 22, 0, 27, 17, 33, 0]
    expected_targets = [X] * 20 + [27, 17, 33, 0, 29]  # 'y' 'o' <|im_end|> '\n' EOS: the answer and its end
    assert batch["input_ids"].tolist() == [expected_inputs]
    assert batch["shift_labels"].tolist() == [expected_targets]
    assert end_of_turn_token(tok) == 33  # generation also stops at <|im_end|>


def test_multi_turn_learns_every_answer_only(tok):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    example = tokenize_example({"messages": messages}, tok)
    learned = tok.decode([i for i, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != X])
    assert learned == "b<|im_end|>\nd<|im_end|>\n<|endoftext|>"
    assert tok.decode(example["input_ids"]).startswith("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\na")


def test_long_examples_are_dropped_and_counted(tok, caplog):
    rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "abcdefgh", "completion": "ijk"}]
    with caplog.at_level(logging.WARNING, logger="lmkit.sft"):
        ds = build_sft_dataset(rows, tok, block_size=5)  # at most 6 tokens: the second has 12
    assert ds["input_ids"] == [[3, 4, 5, 29]]
    assert "dropped 1 of 2 examples longer than --block_size + 1 = 6 tokens" in caplog.text
    with pytest.raises(LMKitError, match="every example is longer"):
        build_sft_dataset(rows[1:], tok, block_size=5)


# -- packing ----------------------------------------------------------------------------------------------------


def test_packing_restarts_positions_and_masks_boundaries():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [X, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [X, X, 8, 9]},
    ]
    rows = list(pack_examples(examples, row_len=6, pad_token_id=0))
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5, 0], "labels": [X, 2, 3, X, 5, X], "position_ids": [0, 1, 2, 0, 1, 0]},
        {"input_ids": [6, 7, 8, 9, 0, 0], "labels": [X, X, 8, 9, X, X], "position_ids": [0, 1, 2, 3, 0, 1]},
    ]
    batch = CausalLMCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch  # so transformers reads the example boundaries from position_ids
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]


def _lmkit_model():
    return LMForCausalLM(tiny_config(40, pad_token_id=None))


def _llama_model():
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


def _token_losses(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "shift_labels"}, use_cache=False).logits
    return F.cross_entropy(logits.transpose(1, 2), batch["shift_labels"], reduction="none")  # (B, T), 0 where -100


@pytest.mark.parametrize("build", [_lmkit_model, _llama_model], ids=["lmkit", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_example_its_unpacked_loss(tok, build, attn):
    torch.manual_seed(0)
    model = build().eval()
    model.config._attn_implementation = attn
    rows = [
        {"prompt": "ab", "completion": "cd"},
        {"prompt": "xyz", "completion": "w"},
        {"prompt": "q", "completion": "rst"},
    ]
    examples = [tokenize_example(r, tok, train_on_prompt=True) for r in rows]
    collate = CausalLMCollator(pad_token_id=tok.pad_token_id)
    packed_rows = list(pack_examples(examples, row_len=32, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        unpacked = _token_losses(model, collate(examples))  # padded, with attention_mask
        packed = _token_losses(model, collate(packed_rows))
    start = 0
    for i, example in enumerate(examples):
        n = len(example["input_ids"]) - 1  # target positions of example i
        # packed position start+j predicts the same token as unpacked position j, except the boundary target
        torch.testing.assert_close(packed[0, start + 1 : start + n], unpacked[i, 1:n])
        start += n + 1
    # Without restarting positions the examples would see each other: a real check, not a tautology.
    flat = collate(packed_rows)
    del flat["position_ids"]
    with torch.no_grad():
        leaky = _token_losses(model, flat)
    n0 = len(examples[0]["input_ids"])
    assert not torch.allclose(leaky[0, n0 + 1 : n0 + 3], unpacked[1, 1:3])


# -- files ------------------------------------------------------------------------------------------------------


def test_detect_format(tmp_path):
    assert (
        detect_format([write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])]) == PROMPT_COMPLETION
    )
    assert detect_format([write_jsonl(tmp_path / "b.jsonl", [{"messages": []}])]) == CHAT
    assert detect_format([write_jsonl(tmp_path / "c.jsonl", [{"text": "t"}])]) == TEXT
    (tmp_path / "d.txt").write_text("raw text")
    assert detect_format([tmp_path / "d.txt"]) == TEXT


@pytest.mark.parametrize(
    "rows, fmt, message",
    [
        (
            [{"prompt": "p", "completion": "c"}, {"prompt": "p"}],
            PROMPT_COMPLETION,
            r"\.jsonl:2: no 'completion' field",
        ),
        (
            [{"prompt": "p", "completion": "c"}, {"completion": 3, "prompt": "p"}],
            PROMPT_COMPLETION,
            r":2: 'completion' is int",
        ),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, {"text": "x"}],
            CHAT,
            r":2: no 'messages' field",
        ),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}],
            CHAT,
            r":1: message 1 has unknown role 'bot' \(roles: system, user, assistant\)",
        ),
        ([{"messages": [{"role": "user", "content": "q"}]}], CHAT, r":1: no 'assistant' message"),
    ],
    ids=["missing-completion", "completion-not-string", "missing-messages", "unknown-role", "no-assistant"],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, fmt, message):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(LMKitError, match=message):
        read_sft_rows([path], fmt, "--train_files")


def test_chat_template_file_and_missing_file(tmp_path, tok):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|new_marker|>{{ m['content'] }}{% endfor %}")
    assert resolve_chat_template(str(template), tok)[1] == ["<|new_marker|>"]
    with pytest.raises(LMKitError, match="--chat_template .*nope.jinja: no such file"):
        resolve_chat_template(str(tmp_path / "nope.jinja"), tok)


# -- streaming --------------------------------------------------------------------------------------------------


def _mixed_rows(n: int) -> list[dict]:
    """Prompt/completion rows of varied length; every 7th is too long for block_size 16 and is dropped."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [{"prompt": letters[i % 20 : i % 20 + 2 + i % 5], "completion": letters[i % 7 : i % 7 + (12 if i % 7 == 3
             else 1 + i % 4)]} for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("fmt", [PROMPT_COMPLETION, CHAT])
def test_stream_yields_the_in_memory_rows(tmp_path, tok, caplog, fmt, packing):
    rows = _mixed_rows(40)
    if fmt == CHAT:
        rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
                for r in rows]  # fmt: skip
    half = len(rows) // 2  # two files: the stream crosses a file boundary, packing too
    files = [write_jsonl(tmp_path / "a.jsonl", rows[:half]), write_jsonl(tmp_path / "b.jsonl", rows[half:])]
    block_size = 33 if fmt == CHAT else 16  # chat: 22 template tokens more per example
    kwargs = {"train_on_prompt": fmt == CHAT, "packing": packing}
    in_memory = build_sft_dataset(rows, tok, block_size, **kwargs).to_list()
    with caplog.at_level(logging.WARNING, logger="lmkit.sft"):
        streamed = list(SFTStream(files, fmt, tok, block_size, **kwargs))
    assert streamed == in_memory
    dropped = [r for r in rows if len(tokenize_example(r, tok)["input_ids"]) > block_size + 1]
    assert dropped and f"train: dropped {len(dropped)} of 40 examples" in caplog.text
    assert list(SFTStream(files, fmt, tok, block_size, **kwargs)) == in_memory  # a second pass (next epoch): same


def test_stream_hold_out_and_validation_partition_the_rows(tmp_path, tok):
    from lmkit.args import DataArguments

    abc = "abcdefghijklmnopqrstuvwxyz"
    unique = [{"prompt": abc[i % 26] + abc[i // 26], "completion": abc[i % 8] * (1 + i % 3)} for i in range(60)]
    path = write_jsonl(tmp_path / "train.jsonl", unique)
    data_args = DataArguments(train_files=[str(path)], validation_split=0.25, block_size=16, streaming=True)
    splits = build_sft_datasets(data_args, tok, seed=3)
    assert isinstance(splits["train"], SFTStream)
    train = [tuple(r["input_ids"]) for r in splits["train"]]
    validation = [tuple(r["input_ids"]) for r in splits["validation"]]
    everything = [tuple(r["input_ids"]) for r in build_sft_dataset(unique, tok, 16)]
    assert sorted(train + validation) == sorted(everything) and not set(train) & set(validation)
    assert 0 < len(validation) < len(train)
    again = build_sft_datasets(data_args, tok, seed=3)  # the hash, not an order, decides: the same split again
    assert [tuple(r["input_ids"]) for r in again["validation"]] == validation
    no_validation = build_sft_datasets(DataArguments(**{**vars(data_args), "validation_split": 0.0}), tok, seed=3)
    assert no_validation["validation"] is None
    assert sorted(tuple(r["input_ids"]) for r in no_validation["train"]) == sorted(everything)


def test_a_json_array_file_cannot_stream(tmp_path, tok):
    from lmkit.args import DataArguments

    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}] * 4))
    data_args = DataArguments(train_files=[str(path)], validation_split=0.0, block_size=16, streaming=True)
    with pytest.raises(LMKitError, match=r"^--streaming: --train_files .*rows.json holds one JSON array, which can "
                                         r"only be read whole; write it as JSON lines"):  # fmt: skip
        build_sft_datasets(data_args, tok)
    assert len(build_sft_datasets(DataArguments(**{**vars(data_args), "streaming": False}), tok)["train"]) == 4
