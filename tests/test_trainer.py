"""LMTrainer: optimizer groups, token-normalised gradient accumulation, no double label shift, metrics."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, VOCAB, cpu_args, tiny_model
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from lmkit.args import LMTrainingArguments
from lmkit.collator import CausalLMCollator
from lmkit.trainer import LMTrainer


def training_args(tmp_path, **overrides) -> LMTrainingArguments:
    return cpu_args(tmp_path, **{"dataloader_drop_last": False, "seed": 1, **overrides})


class GradCatcher(TrainerCallback):
    """Keeps a copy of every gradient just before the first optimizer step."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def ragged_rows(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 24, (1,), generator=g))
        rows.append({"input_ids": torch.randint(1, VOCAB, (length,), generator=g).tolist()})
    return Dataset.from_list(rows)


def grads_after_one_step(tmp_path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    model = tiny_model()
    catcher = GradCatcher(model)
    trainer = LMTrainer(
        model=model,
        args=training_args(
            tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1
        ),
        train_dataset=ragged_rows(),
        data_collator=CausalLMCollator(pad_token_id=0),
        callbacks=[catcher],
    )
    trainer.train()
    return catcher.grads


@pytest.mark.parametrize("rows, micro_batch, atol", [(16, 4, 1e-5), (4, 1, 1e-6)])
def test_accumulation_matches_one_big_batch(tmp_path, rows, micro_batch, atol):
    # Micro-batches with ragged padding (or, of one row each, none and unequal token counts) vs one batch of all
    # rows: the stock Trainer counts the collator's targets over the accumulated batch (the batch's `labels` key
    # lets it count `shift_labels`), so the gradients agree to float rounding. A per-micro-batch mean would not.
    big = grads_after_one_step(tmp_path / "a", batch_size=rows, accumulation=1)
    small = grads_after_one_step(tmp_path / "b", batch_size=micro_batch, accumulation=rows // micro_batch)
    assert big.keys() == small.keys()
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=atol, rtol=atol, msg=name)


def test_gradient_accumulation_counts_every_target_token(tmp_path):
    # The number the loss is divided by: all targets of the 4 micro-batches, not a per-micro-batch mean.
    trainer = LMTrainer(model=tiny_model(), args=training_args(tmp_path), data_collator=CausalLMCollator(0))
    batches = [trainer.data_collator([{"input_ids": list(range(1, n + 2))}]) for n in (3, 5, 8, 2)]
    assert trainer._get_num_items_in_batch(batches, torch.device("cpu")) == 3 + 5 + 8 + 2


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **{k: v for k, v in TINY.items() if k != "loss_chunk_size"}))


@pytest.mark.parametrize("build", [tiny_model, tiny_llama], ids=["lmkit", "llama"])
def test_loss_through_collator_and_trainer_has_no_double_shift(tmp_path, build):
    # transformers' own models read the same batch: a loss because `labels` is there, on `shift_labels` as given.
    model = build().eval()
    seq = torch.tensor([5, 17, 3, 42, 8, 8, 61, 2, 9])
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": seq.tolist()}])
    trainer = LMTrainer(model=model, args=training_args(tmp_path), data_collator=CausalLMCollator(pad_token_id=0))
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, dict(batch))
        hf_loss = model(input_ids=seq[None], labels=seq[None]).loss  # HF convention: the model shifts
        logits = model(input_ids=seq[None, :-1]).logits[0]  # (8, vocab)
    by_hand = F.cross_entropy(logits.float(), seq[1:])
    torch.testing.assert_close(trainer_loss, by_hand)
    torch.testing.assert_close(hf_loss, by_hand)


def test_weight_decay_only_on_weight_matrices(tmp_path):
    model = tiny_model()
    trainer = LMTrainer(model=model, args=training_args(tmp_path), data_collator=CausalLMCollator(pad_token_id=0))
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.embed_tokens.weight" in decayed
    assert "model.norm.weight" in plain and "model.layers.1.input_layernorm.weight" in plain
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed) and all(
        model.get_parameter(n).ndim == 1 for n in plain
    )
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01, 0.0}
    assert isinstance(optimizer, torch.optim.AdamW) or "AdamW" in type(optimizer).__name__
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_logs_perplexity_tokens_per_second_and_eval(tmp_path):
    rows = Dataset.from_list([{"input_ids": list(range(1, 18))} for _ in range(32)])
    trainer = LMTrainer(
        model=tiny_model(),
        args=training_args(
            tmp_path,
            max_steps=4,
            logging_steps=2,
            per_device_train_batch_size=4,
            eval_strategy="steps",
            eval_steps=4,
            learning_rate=1e-2,
        ),  # fmt: skip
        train_dataset=rows,
        eval_dataset=rows.select(range(8)),
        data_collator=CausalLMCollator(pad_token_id=0),
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4]
    for h in train_logs:
        assert h["perplexity"] == pytest.approx(math.exp(h["loss"]))
        assert h["num_input_tokens_seen"] == h["step"] * 4 * 16
        assert "grad_norm" in h and "learning_rate" in h
    assert train_logs[1]["tokens_per_second"] > 0
    assert eval_logs[0]["eval_perplexity"] == pytest.approx(math.exp(eval_logs[0]["eval_loss"]))


@pytest.mark.parametrize("compile_", [False, True])
def test_compiled_training_drops_the_short_last_batch_only_for_training(tmp_path, dynamo_env, compile_):
    # 16 rows in batches of 5: 5, 5, 5, 1. Under torch.compile the 1-row batch would recompile the model.
    args = training_args(tmp_path, per_device_train_batch_size=5, per_device_eval_batch_size=5, torch_compile=compile_)
    trainer = LMTrainer(
        model=tiny_model(), args=args, train_dataset=ragged_rows(), eval_dataset=ragged_rows(),
        data_collator=CausalLMCollator(pad_token_id=0),
    )  # fmt: skip
    train_sizes = [len(batch["input_ids"]) for batch in trainer.get_train_dataloader()]
    eval_sizes = [len(batch["input_ids"]) for batch in trainer.get_eval_dataloader()]
    assert train_sizes == ([5, 5, 5] if compile_ else [5, 5, 5, 1])
    assert eval_sizes == [5, 5, 5, 1]  # evaluation always scores every row
    assert trainer.args.dataloader_drop_last is False  # the user's setting is left as it was


class EvalCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.parametrize("eval_steps, expected_evals", [(4, [4, 8]), (3, [3, 6, 8])])
def test_final_evaluation_reuses_an_eval_on_the_last_step(tmp_path, eval_steps, expected_evals):
    from lmkit.runtime import save_and_evaluate

    counter = EvalCounter()
    args = training_args(
        tmp_path, per_device_train_batch_size=2, max_steps=8, eval_strategy="steps", eval_steps=eval_steps,
        logging_steps=4, save_strategy="no",
    )  # fmt: skip
    trainer = LMTrainer(
        model=tiny_model(), args=args, train_dataset=ragged_rows(), eval_dataset=ragged_rows(6),
        data_collator=CausalLMCollator(pad_token_id=0), callbacks=[counter],
    )  # fmt: skip
    metrics = save_and_evaluate(trainer, trainer.train())
    # eval_steps 4: the step-8 evaluation already scored the final weights, so it is not run again
    assert counter.steps == expected_evals
    last_eval = [e for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert metrics["eval_loss"] == last_eval["eval_loss"]
    assert math.isclose(metrics["eval_loss"], trainer.evaluate()["eval_loss"], rel_tol=1e-6)


def test_length_grouped_sampler_is_seeded_by_seed_and_epoch():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from lmkit.trainer import SeededLengthGroupedSampler, sequence_lengths

    rows = Dataset.from_dict({"input_ids": [[1] * n for n in (5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12)]})
    lengths = sequence_lengths(rows.select([11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))  # a select is honoured
    assert lengths == [12, 5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    a, b = SeededLengthGroupedSampler(2, lengths, seed=3), SeededLengthGroupedSampler(2, lengths, seed=3)
    first = list(a)
    assert first == list(b) == list(a)  # the same order every time for the same seed and epoch
    assert first == get_length_grouped_indices(lengths, 2, generator=torch.Generator().manual_seed(3))
    a.set_epoch(1)
    assert list(a) == get_length_grouped_indices(lengths, 2, generator=torch.Generator().manual_seed(4))
    assert list(a) != first and sorted(first) == list(range(12))


def test_mixture_eval_loss_is_the_mean_over_every_target(tmp_path):
    from datasets import concatenate_datasets

    from lmkit.trainer import trained_targets

    def sft_rows(lengths, prompt):  # rows of `n` tokens whose first `prompt` labels are masked
        ids = [[(7 * i + j) % (VOCAB - 1) + 1 for j in range(n)] for i, n in enumerate(lengths)]
        labels = [[-100] * prompt + row[prompt:] for row in ids]
        return Dataset.from_dict({"input_ids": ids, "labels": labels})

    a, b = sft_rows([12, 12, 12], 2), sft_rows([30, 6], 1)  # 3 x 10 and 29 + 5 targets: 30 vs 34, rows 3 vs 2
    assert (trained_targets(a), trained_targets(b)) == (30, 34)
    args = cpu_args(tmp_path, per_device_eval_batch_size=8)  # each set is one batch: its loss a mean over targets
    trainer = LMTrainer(model=tiny_model(), args=args, data_collator=CausalLMCollator(pad_token_id=0))
    mixed = trainer.evaluate({"a": a, "b": b})
    whole = trainer.evaluate(concatenate_datasets([a, b]))["eval_loss"]  # one batch of all 64 targets
    torch.testing.assert_close(mixed["eval_loss"], whole, rtol=1e-6, atol=0)
    by_rows = (3 * mixed["eval_a_loss"] + 2 * mixed["eval_b_loss"]) / 5
    assert abs(by_rows - whole) > 5e-5  # the row-weighted mean it replaced is another number (by 9.4e-5 here)
