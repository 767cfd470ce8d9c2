"""Steps every recipe shares: logging set-up, the start-up report, output-dir safety, resume detection, saving."""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import MISSING, fields
from itertools import takewhile
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from lmkit import hub, launcher
from lmkit.checkpoint import FINISHED_MODEL_FILES, check_resume_checkpoint, complete_checkpoints
from lmkit.distributed import validate_distributed
from lmkit.errors import LMKitError, call_on_recipe_exit
from lmkit.lock import OutputDirLock
from lmkit.perf import keep_freed_memory
from lmkit.trainer import LMTrainer

logger = logging.getLogger(__name__)


def prepare_run(args: TrainingArguments, *groups: Any, checks: Callable[[], None] | None = None) -> str | None:
    """The start of every training recipe: start logging, check the launch and the output dir, run the recipe's own
    ``checks`` (which may log how a default was fitted), set the CPU threads and the CPU allocator, take the output
    dir's lock, log the start-up report. Returns the checkpoint to resume from (None: a fresh start). Every input
    check comes before the report, so an error is the last thing printed. The process-wide CPU settings (threads,
    malloc) are made here, by the recipe, and logged: not at import, not by `LMTrainer`."""
    setup_logging(args)
    if launcher.came_up_alone():
        raise LMKitError(
            "this process came up alone in a world of size 1, though its launcher set up a multi-process run "
            f"(MASTER_ADDR {os.environ['MASTER_ADDR']}): accelerate launch --cpu starts each process by itself unless "
            "run under mpirun; drop --cpu (CPU-only machines run torchrun with gloo) or launch through mpirun"
        )
    validate_distributed(args)  # DeepSpeed / multi-node settings, before anything is built
    check_output_dir(args)
    resume_from = resolve_resume_checkpoint(args)
    if checks is not None:
        checks()
    threads = configure_threads(args.num_threads, cpu=args.use_cpu)
    configure_allocator(args)
    lock_output_dir(args)
    log_startup(args, *groups, threads=threads)
    return resume_from


def configure_threads(requested: int | None = None, cpu: bool | None = None) -> str:
    """Set this process's CPU threads and say where the number came from.

    ``requested`` (``--num_threads``) wins; then a count the user gave outside lmkit (``OMP_NUM_THREADS``, or
    accelerate's ``--num_cpu_threads_per_process``); else, when the CPU does the math (``cpu``; None: when there is
    no accelerator), the usable cores
    shared among the processes on this machine. ``accelerate launch`` without a config exports ``OMP_NUM_THREADS=1``
    to its child: that default is not the user's choice, and on a CPU it would leave all cores but one idle.
    """
    if requested:
        source = "--num_threads"
    elif (requested := launcher.user_set_threads()) is not None:
        source = "OMP_NUM_THREADS"
    elif cpu if cpu is not None else not torch.accelerator.is_available():
        cores, local = launcher.usable_cores(), launcher.local_processes()
        requested = max(1, cores // local)
        source = f"{cores} cores / {local} process{'es' if local > 1 else ''}"
    else:  # an accelerator does the math: leave the launcher's setting
        return f"{torch.get_num_threads()} (launcher's)"
    torch.set_num_threads(requested)
    return f"{requested} ({source})"


def configure_allocator(args: TrainingArguments) -> bool:
    """``--cpu_allocator_reuse`` on a CPU run: glibc malloc keeps the memory each step frees for the next step
    (`lmkit.perf.keep_freed_memory`). Process-wide, so a recipe's set-up does it, never a library import or the
    Trainer. True (and one log line) when applied; a GPU run, the flag off, or a C library other than glibc: False."""
    if not (args.use_cpu and getattr(args, "cpu_allocator_reuse", False)):
        return False
    applied = keep_freed_memory()
    if applied:
        logger.info("cpu allocator: freed memory kept for reuse (--cpu_allocator_reuse)")
    return applied


def lock_output_dir(args: TrainingArguments) -> None:
    """Take ``--output_dir``'s run lock on the global main process, held until the recipe ends; the other ranks
    wait for it, so none starts on a dir that another run holds."""
    # Every rank's write probe (`check_output_dir`) ends before rank 0 may create the dir: a probe file inside a dir
    # the lock created would make a failed run's clean-up (rmdir of the dir it created) fail and leave the dir behind.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    with args.main_process_first(local=False, desc="output dir lock"):
        if args.process_index == 0:
            lock = OutputDirLock(args.output_dir)
            lock.acquire()
            call_on_recipe_exit(lock.release)


def setup_logging(args: TrainingArguments) -> None:
    """Console logging for lmkit, transformers and datasets; replicas stay quiet unless asked."""
    import datasets
    import transformers

    level = args.get_process_log_level()  # "passive": transformers' default, WARNING
    # lmkit's own start-up report and progress notes are INFO: shown on the main process unless asked otherwise.
    lmkit_level = logging.INFO if args.should_log and args.log_level == "passive" else level
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, level=level
    )
    logging.getLogger("lmkit").setLevel(lmkit_level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(max(level, logging.WARNING))


def setup_tool_logging(level: int | str = logging.INFO) -> None:
    """Logs (lmkit's, transformers', datasets') to stdout and no progress bars, for the evaluate / generate /
    publish recipes: stderr then carries nothing but a failure's one-line message."""
    import datasets
    import huggingface_hub
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level, stream=sys.stdout
    )
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def log_startup(args: TrainingArguments, *dataclasses: Any, threads: str | None = None) -> None:
    """Log the resolved configuration, package versions, device and CPU threads, on the main process only."""
    if not args.should_log:
        return
    import accelerate
    import datasets
    import tokenizers
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
    }
    logger.info("versions: %s", ", ".join(f"{k} {v}" for k, v in versions.items()))
    logger.info(
        "device: %s, world size %d, bf16 %s, threads %s",
        args.device,
        args.world_size,
        args.bf16,
        threads or torch.get_num_threads(),
    )
    for group in dataclasses:
        shown = {k: "<redacted>" if k.endswith("_token") and v else v for k, v in vars(group).items()}
        logger.info("%s: %s", type(group).__name__, {k: v for k, v in shown.items() if not k.startswith("_")})
    # TrainingArguments has ~150 fields: show the ones this run sets away from transformers' declared defaults.
    # (Not by building a reference TrainingArguments: on one rank only, that resets the global DeepSpeed
    # config, so ZeRO-3's zero.Init then ran on the other ranks alone and the collectives hung.)
    changed = {}
    for f in fields(TrainingArguments):
        if not f.init or f.name.endswith("_token"):
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(args, f.name)
        if (
            default is not MISSING
            and value != default
            and not (value in ([], [default]) or str(value) == str(default))
        ):
            changed[f.name] = value
    logger.info("TrainingArguments (non-default): %s", changed)


# What a training run writes into its output dir besides the model (`FINISHED_MODEL_FILES`) and checkpoints: the
# Trainer's state and metrics, the tokenizer, peft's model card (README.md), the merged LoRA model. A file the user
# keeps there under one of these names would be replaced without a word; TensorBoard's runs/ only gains files.
RUN_OUTPUT_NAMES = (
    "README.md", "trainer_state.json", "training_args.bin", "all_results.json", "train_results.json",
    "eval_results.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "merged",
)  # fmt: skip


def check_output_dir(args: TrainingArguments) -> None:
    """Refuse an output dir that is a file, is not writable, holds a finished model that this run would replace, or
    holds a file under a name the run writes (`RUN_OUTPUT_NAMES`).

    A finished model (config.json / model weights in the dir itself) may only be replaced with
    ``--overwrite_output_dir``, or continued with ``--resume_from_checkpoint`` (a path, or ``auto`` when the dir
    holds a complete checkpoint; ``auto`` with none would silently start over, so it is refused too).
    """
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise LMKitError(f"--output_dir {out} exists and is not a directory")
    _check_writable(out)
    if getattr(args, "overwrite_output_dir", False):
        return
    resume = args.resume_from_checkpoint
    if resume and (resume != "auto" or complete_checkpoints(out, log=False)):  # resolve_resume_checkpoint logs
        return
    finished = [name for name in FINISHED_MODEL_FILES if (out / name).exists()]
    if finished:
        raise LMKitError(
            f"--output_dir {out} already holds a finished model ({finished[0]}); pass --overwrite_output_dir to "
            "replace it, --resume_from_checkpoint auto to continue from a checkpoint, or choose another --output_dir"
        )
    taken = [name for name in RUN_OUTPUT_NAMES if (out / name).exists()]
    if taken:
        raise LMKitError(
            f"--output_dir {out} holds {taken[0]}, which this run would overwrite; move it, pass "
            "--overwrite_output_dir to let the run replace it, or choose another --output_dir"
        )


def _check_writable(out: Path) -> None:
    # Probe with a real file: permission bits say nothing for root, and a read-only mount only shows on write.
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise LMKitError(f"--output_dir {out}: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmkit-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LMKitError(f"--output_dir {out}: not writable ({err.strerror or err})") from err


def resolve_resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint PATH`` (checked complete) or ``auto``.

    ``auto`` picks the newest complete ``checkpoint-N`` in the output dir, skipping (and logging) incomplete or
    corrupted ones; None when there is none (a fresh start). A PATH that is missing, incomplete, has only pickled
    weights or a corrupted safetensors file raises `LMKitError` naming the flag.
    """
    value = args.resume_from_checkpoint
    if not value:
        return None
    if value != "auto":
        check_resume_checkpoint(value)
        return value
    out = Path(args.output_dir)
    complete = complete_checkpoints(out)
    if not complete:
        logger.info("--resume_from_checkpoint auto: no complete checkpoint in %s, starting fresh", out)
        return None
    logger.info("resuming from %s", complete[-1])
    return str(complete[-1])


def num_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count (tied weights once); without embeddings when asked (the usual scaling-law count)."""
    seen: set[int] = set()
    total = 0
    embedding_ids = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                embedding_ids.add(id(module.weight))
        output = getattr(model, "get_output_embeddings", lambda: None)()
        if output is not None:
            embedding_ids.add(id(output.weight))
    for param in model.parameters():
        if id(param) in seen or id(param) in embedding_ids:
            continue
        seen.add(id(param))
        total += getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 leaves an empty local shard
    return total


def model_size(model: torch.nn.Module, without_embeddings: bool = False) -> str:
    """A model's size as the start-up report gives it: ``"1,234 parameters"``, with ``without_embeddings`` followed
    by the count without them (the usual scaling-law count): ``"1,234 parameters (1,000 without embeddings)"``."""
    size = f"{num_parameters(model):,} parameters"
    if without_embeddings:
        size += f" ({num_parameters(model, exclude_embeddings=True):,} without embeddings)"
    return size


def tokens_per_step(args: TrainingArguments, block_size: int) -> int:
    """Tokens in one optimizer step: batch x block x accumulation x ranks (at most, for padded batches)."""
    return args.per_device_train_batch_size * block_size * args.gradient_accumulation_steps * args.world_size


def _eval_of_final_step(trainer: Any) -> dict[str, float] | None:
    """The metrics of an evaluation the Trainer already ran on the final weights (an eval step that fell on the last
    step), so the end of the run does not score the same weights twice; None when there is none."""
    if trainer.args.load_best_model_at_end:  # the final weights are the best checkpoint's, not the last step's
        return None
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if not evals or evals[-1].get("step") != trainer.state.global_step:
        return None
    last = evals[-1]
    return {key: value for key, value in last.items() if key != "step"}


def save_and_evaluate(trainer: Any, train_result: Any) -> dict[str, float]:
    """The end of every training recipe: save the model (KV cache back on), metrics and trainer state; evaluate;
    write the run's lineage record (``lmkit_run.json``: `run_stage` after its starting point's stages).

    Returns the train metrics (``train_loss``, ...) and, unless ``--eval_strategy no`` (or there is no eval set),
    the final evaluation's (``eval_loss``, ...).
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    base.config.use_cache = True  # the Trainer turned the cache off for training; the saved model generates
    trainer.save_model()
    if trainer.is_world_process_zero() and getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(trainer.args.output_dir)  # an adapter save omits it
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if trainer.args.eval_strategy != "no" and trainer.eval_dataset is not None:
        eval_metrics = _eval_of_final_step(trainer) or trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        hub.write_run_record(trainer.args.output_dir, run_stage(trainer, base, metrics))
    return metrics


def run_stage(trainer: Any, model: torch.nn.Module, metrics: dict[str, float]) -> dict[str, Any]:
    """This run's entry in the model's lineage (`lmkit.hub.write_run_record`): recipe, starting point (the folder or
    hub id its weights were loaded from; none for a model built from a config), data, steps, final metrics.

    The recipe is the launched ``recipes/NAME.py``; called in-process, the trainer says which (a preference trainer:
    dpo; otherwise pretrain from scratch, finetune from a starting point). The data flags are read from that
    command line (and its ``--config``), so in-process calls record none."""
    starting_point = getattr(model.config, "_name_or_path", "") or None
    preference = getattr(trainer, "preference_args", None)
    script = Path(sys.argv[0])
    if script.parent.name == "recipes" and script.suffix == ".py":
        recipe, data = script.stem, command_line_data(sys.argv[1:])
    else:
        recipe, data = "dpo" if preference else "finetune" if starting_point else "pretrain", []
    stage: dict[str, Any] = {"recipe": recipe, "starting_point": starting_point, "data": data}
    if preference is not None:
        stage.update(loss_type=preference.loss_type, beta=preference.beta)
    tokens = trainer.state.num_input_tokens_seen
    stage.update(steps=trainer.state.global_step, tokens_seen=tokens or None, metrics=hub.stage_metrics(metrics))
    stage["output_dir"] = str(trainer.args.output_dir)
    return stage


_DATA_FLAGS = ("train_files", "validation_files", "dataset_name", "dataset_config_name")


def command_line_data(argv: list[str]) -> list[str]:
    """The data a recipe's command line names: ``--train_files`` / ``--validation_files`` / ``--dataset_name`` (and
    its config) from the flags or their ``--config`` file, the flags winning; the bundled corpus when none."""
    from lmkit.args import BUNDLED_CORPUS, load_yaml_config

    given: dict[str, Any] = {}
    if "--config" in argv[:-1]:
        config = load_yaml_config(argv[argv.index("--config") + 1])
        given.update({k: config[k] for k in _DATA_FLAGS if config.get(k)})
    for i, arg in enumerate(argv):
        flag, eq, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and flag in _DATA_FLAGS:
            given[flag] = [value] if eq else list(takewhile(lambda a: not a.startswith("--"), argv[i + 1 :]))
    data = [str(v) for k in ("train_files", "validation_files") for v in _as_list(given.get(k))]
    if given.get("dataset_name"):
        name, config_name = _as_list(given["dataset_name"])[0], _as_list(given.get("dataset_config_name"))
        data.append(f"{name} ({config_name[0]})" if config_name else str(name))
    return data or [f"lmkit's bundled corpus ({BUNDLED_CORPUS.name})"]


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def train_and_save(
    model: torch.nn.Module,
    args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    tokenizer: Any,
    resume_from: str | None,
    trainer_class: type[Trainer] | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, dict[str, float]]:
    """The train and save steps of every training recipe: build the trainer (``trainer_class``, default
    `LMTrainer`, given ``trainer_kwargs`` too), train from ``resume_from`` (None: a fresh start), then
    `save_and_evaluate`. Returns the trainer and the metrics."""
    trainer = (trainer_class or LMTrainer)(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        **trainer_kwargs,
    )
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    return trainer, save_and_evaluate(trainer, train_result)
