"""LMTrainer: the stock `transformers.Trainer` with lmkit's optimizer groups, token-normalised loss and metrics.

Only a few hooks are overridden; the loop, checkpoints, schedules and distribution stay the Trainer's own.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import speed_metrics

from lmkit import reliability
from lmkit.checkpoint import Checkpointer, check_checkpoint_matches_model, complete_checkpoints
from lmkit.perf import SpeedMeter

logger = logging.getLogger(__name__)


class LMTrainer(Trainer):
    """Trainer for causal LMs fed by `lmkit.collator.CausalLMCollator`.

    - AdamW (``args.optim``, fused where torch has it) with weight decay on weight matrices only: every parameter
      with two or more dimensions decays; norms and biases do not.
    - Gradient accumulation normalises the loss over all target tokens of the accumulated batch (across ranks too),
      so 4 micro-batches of 4 give the same gradient as one batch of 16, whatever their padding.
    - Logs perplexity (when the loss is a token cross-entropy: ``loss_is_token_cross_entropy``), tokens/s over the
      last logging interval and tokens seen; eval logs perplexity.
    - Logs MFU over the interval against the peak FLOP/s it names (``--peak_flops``, a known GPU's data sheet, or
      measured on a CPU; see `lmkit.perf`), and ``data_wait_fraction``: the share of wall time spent fetching batches.
    - Checkpoints (`lmkit.checkpoint`, the ``checkpointer`` it owns): checkpoints and the final model appear only
      when complete; a streaming run resumes at the stream position saved in its checkpoint instead of replaying it.
    - ``--train_sampling_strategy group_by_length`` draws its order from ``--seed`` and the epoch
      (`SeededLengthGroupedSampler`), so a run resumed mid-epoch sees the same batches as one never stopped.
    - Reliability (`lmkit.reliability`): SIGTERM/SIGINT checkpoint and exit; NaN/Inf steps are skipped and counted
      (``nonfinite_skipped``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
        self.speed = SpeedMeter(self.args.device, dtype, getattr(self.args, "peak_flops", None))
        self._staging_dir: str | None = None  # where `_save_checkpoint` writes while the checkpointer stages it
        self.nonfinite_guard = reliability.NonFiniteGuard(getattr(self.args, "max_nonfinite_steps", 5))
        self.add_callback(self.nonfinite_guard)
        self.preemption = reliability.PreemptionCallback()
        self.add_callback(self.preemption)
        # The Trainer's own RNG restore, so every device's generators come back as the stock resume sets them.
        self.checkpointer = Checkpointer(self.args, self.accelerator.wait_for_everyone, self._load_rng_state)
        self.add_callback(self.checkpointer)

    # -- data ------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        if not self.args.torch_compile or self.args.dataloader_drop_last:
            return super().get_train_dataloader()
        # Under torch.compile a short last batch is a new input shape: the whole model recompiles for it at every
        # epoch's end (15-20 s on shakespeare-char, 2 cores). Drop it for training only; the sampler reshuffles each
        # epoch, so a different handful of rows sits out each time and evaluation still scores every block.
        self.args.dataloader_drop_last = True
        try:
            return super().get_train_dataloader()
        finally:
            self.args.dataloader_drop_last = False

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, datasets.Dataset):
            return super()._get_train_sampler(train_dataset)
        # The stock sampler draws its order from the global RNG when the epoch's iteration starts; a resumed run
        # reaches that point with another RNG state (restored from the checkpoint's step), so its batches would
        # differ from the uninterrupted run's. And it reads every row to learn the lengths; Arrow has them.
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps  # the stock megabatch unit
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler(batch, lengths=sequence_lengths(dataset), seed=seed)

    # -- optimizer -------------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Shape, not name, decides: works for any architecture (peft-wrapped included) without a list of patterns.
        return [name for name, param in model.named_parameters() if param.ndim >= 2]

    # -- loss ------------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe_loss(loss)
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.nonfinite_guard.observe_grad_norm(grad_norm)
        return grad_norm

    # -- checkpoints (lmkit.checkpoint) ----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True and (complete := complete_checkpoints(self.args.output_dir)):
            resume_from_checkpoint = str(complete[-1])  # the stock pick takes the newest folder, complete or not
        checkpoint = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        if checkpoint is not None and not self.is_deepspeed_enabled:  # DeepSpeed loads (and checks) its own shards
            check_checkpoint_matches_model(checkpoint, self.model)
        try:
            with self.checkpointer.training(
                checkpoint, self.train_dataset, self.get_total_train_batch_size(self.args)
            ):
                return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:  # `on_train_end` never runs when training raises: a handler left behind would swallow Ctrl-C
            self.preemption.restore_signals()

    # Private override: the Trainer writes a checkpoint straight into the visible OUTPUT_DIR/checkpoint-N and no
    # public hook wraps that write (`on_save` runs after it); the checkpointer needs all of it (weights, optimizer,
    # RNG, trainer state, DeepSpeed / FSDP shards) to land in a staging folder it can fsync and publish by rename.
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        stock_save = functools.partial(super()._save_checkpoint, model, trial)

        def write(staging_dir: str) -> None:
            self._staging_dir = staging_dir
            try:
                stock_save()
            finally:
                self._staging_dir = None

        rows_per_step = self.get_total_train_batch_size(self.args)
        self.checkpointer.save(self.state, super()._get_output_dir(trial), write, self.train_dataset, rows_per_step)

    # Private override: the stock `_save_checkpoint` takes its folder from this method alone, and no argument names
    # it; pointing `args.output_dir` at the staging folder instead would also move what the hub push and the
    # callbacks read.
    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call or self.args.push_to_hub:  # checkpoints are already staged; a hub push wants the dir
            return super().save_model(output_dir, _internal_call)
        write = functools.partial(super().save_model, _internal_call=False)
        self.checkpointer.save_model(write, output_dir or self.args.output_dir)

    # -- evaluation of a mixture ----------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """A dict of eval sets (a mixture's held-out blocks per source, `lmkit.data.build_mixture`) gives
        ``eval_<name>_loss`` per source and ``eval_loss`` over all their targets, logged and passed to the callbacks
        once. The stock dict evaluation logs each set on its own and has no overall ``eval_loss``, which
        ``load_best_model_at_end``, the checkpoints' best metric and lmkit's logs read. Anything else: stock."""
        data = self.eval_dataset if eval_dataset is None else eval_dataset
        if not isinstance(data, dict):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        start, metrics, weighted, total, blocks = time.time(), {}, 0.0, 0, 0
        for name, dataset in data.items():
            output = self.evaluation_loop(
                self.get_eval_dataloader(dataset), description=f"Evaluation ({name})", prediction_loss_only=True,
                ignore_keys=ignore_keys, metric_key_prefix=f"{metric_key_prefix}_{name}",
            )  # fmt: skip
            loss = output.metrics[f"{metric_key_prefix}_{name}_loss"]
            metrics[f"{metric_key_prefix}_{name}_loss"] = loss
            weight = trained_targets(dataset) or output.num_samples
            weighted, total, blocks = weighted + loss * weight, total + weight, blocks + output.num_samples
        metrics[f"{metric_key_prefix}_loss"] = weighted / max(total, 1)
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=blocks))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- speed accounting (lmkit.perf.SpeedMeter) ------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        if not self.speed.started:  # first fetch of this run (or of a resumed run): the first interval starts here
            self.speed.start(self._tokens_seen())
        with self.speed.waiting_for_data():
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batch_samples:
            self.speed.count(batch, getattr(self.model, "config", None))
        return batch_samples, num_items_in_batch

    def _tokens_seen(self) -> int | None:
        return self.state.num_input_tokens_seen if self.args.include_num_input_tokens_seen != "no" else None

    # -- metrics ---------------------------------------------------------------------------------------------
    # Perplexity is exp of a mean token cross-entropy: a subclass whose loss is anything else (a preference loss)
    # sets this False, and its logs carry no perplexity.
    loss_is_token_cross_entropy = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key in ("loss", "eval_loss") if self.loss_is_token_cross_entropy else ():
            if key in logs and math.isfinite(logs[key]):
                prefix = "eval_" if key.startswith("eval_") else ""
                logs[f"{prefix}perplexity"] = math.exp(min(logs[key], 50.0))
        if "loss" in logs and self.speed.started:
            logs.update(self.speed.interval_logs(self._tokens_seen()))
        if "loss" in logs:
            logs.update(self.nonfinite_guard.log_entries())
        super().log(logs, start_time)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' `LengthGroupedSampler` (rows of similar length batched together, megabatches shuffled) with
    its order drawn from ``seed + epoch``: the Trainer (through accelerate's data loader) calls `set_epoch`."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def sequence_lengths(dataset: datasets.Dataset) -> list[int]:
    """Tokens per row of a dataset of ``input_ids`` rows, from its Arrow column (any ``select`` applied)."""
    ids = dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(ids).to_pylist()


def trained_targets(dataset: Any) -> int | None:
    """The loss-bearing targets of a dataset of SFT rows (``labels``, -100 where nothing is learned; the collator's
    targets are ``labels[1:]``), or None for rows without labels: text blocks, whose rows all carry the same number
    of targets, and preference pairs, whose loss is one per pair. A mixture's overall loss weights each source by
    this (or by its row count), so it is the mean over every target, as one eval set of them all would give."""
    if not isinstance(dataset, datasets.Dataset) or "labels" not in dataset.column_names:
        return None
    labels = dataset.select_columns(["labels"]).with_format("arrow")[:]["labels"]
    learned = pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() or 0
    first = pc.sum(pc.not_equal(pc.list_element(labels, 0), -100)).as_py() or 0
    return learned - first
