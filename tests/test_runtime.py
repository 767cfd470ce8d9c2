"""lmkit.runtime's shared recipe steps: the start-up report's derived numbers, and train_and_save."""

import pytest
import torch
from conftest import cpu_args, tiny_model
from datasets import Dataset
from safetensors.torch import load_file

from lmkit.collator import CausalLMCollator
from lmkit.runtime import model_size, tokens_per_step, train_and_save
from lmkit.trainer import LMTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared


def test_tokens_per_step_is_batch_times_block_times_accumulation_times_ranks(tmp_path):
    args = cpu_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert args.world_size == 1
    assert tokens_per_step(args, 128) == 4 * 128 * 2 == 1024


def test_model_size_counts_tied_weights_once_and_embeddings_on_request():
    # conftest's tiny model: embedding 97 x 32 = 3,104; 2 layers of 9,280 (attention 3,072, MLP 6,144, norms 64);
    # final norm 32. Tied: the head adds nothing; untied: its 3,104 again.
    assert model_size(tiny_model()) == "21,696 parameters"
    assert model_size(tiny_model(), without_embeddings=True) == "21,696 parameters (18,592 without embeddings)"
    untied = tiny_model(tie_word_embeddings=False)
    assert model_size(untied, without_embeddings=True) == "24,800 parameters (18,592 without embeddings)"


def blocks(n: int = 8, length: int = 9) -> Dataset:
    ids = torch.randint(1, 97, (n, length), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist()})


class NotingTrainer(LMTrainer):
    def __init__(self, *args, note: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.note = note


def run(output_dir, resume_from=None, seed=0, **overrides):
    args = cpu_args(output_dir, max_steps=2, per_device_train_batch_size=2, logging_steps=1, **overrides)
    return train_and_save(
        tiny_model(seed), args, blocks(), blocks(4), CausalLMCollator(pad_token_id=0), None, resume_from,
        trainer_class=NotingTrainer, note="given",
    )  # fmt: skip


def test_train_and_save_builds_the_given_trainer_trains_saves_and_evaluates(tmp_path):
    trainer, metrics = run(tmp_path / "out", eval_strategy="steps", eval_steps=100)
    assert type(trainer) is NotingTrainer and trainer.note == "given"
    assert trainer.state.global_step == 2
    assert {"train_loss", "eval_loss"} <= set(metrics)
    assert metrics["eval_loss"] == trainer.state.log_history[-2]["eval_loss"]  # the final evaluation, logged
    for name in ("model.safetensors", "config.json", "train_results.json", "eval_results.json", "trainer_state.json"):
        assert (tmp_path / "out" / name).is_file(), name


def test_train_and_save_resumes_where_the_checkpoint_left_off(tmp_path):
    full_trainer, _ = run(tmp_path / "full", save_strategy="steps", save_steps=1)
    # Other initial weights: only the checkpoint's can lead to the same end.
    trainer, _ = run(tmp_path / "resumed", resume_from=str(tmp_path / "full" / "checkpoint-1"), seed=1)
    # The history up to the checkpoint came with it; step 2 ran again on the same batch, to the same weights.
    losses = [(entry["step"], entry["loss"]) for entry in full_trainer.state.log_history if "loss" in entry]
    assert [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry] == losses
    assert [step for step, _ in losses] == [1, 2]
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_parameter_count_of_a_zero3_partitioned_model_is_the_whole_models():
    """Under ZeRO-3 each parameter's local tensor is an empty shard and DeepSpeed records the full size as
    ``ds_numel``: the start-up report must count that (it said 262,400 of 1,049,984: the new embedding rows only)."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))  # 40 + 12 + 3
    assert model_size(model) == "55 parameters"
    for param in model.parameters():  # what zero.Init leaves on a rank
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert model_size(model) == "55 parameters"
