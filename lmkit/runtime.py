"""Steps every recipe shares: logging set-up, the start-up report, output-dir safety, resume detection, saving."""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmkit.errors import LMKitError

logger = logging.getLogger(__name__)

# Files whose presence means an output dir holds a finished model.
FINISHED_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json")


def setup_logging(args: TrainingArguments) -> None:
    """Console logging for lmkit, transformers and datasets; replicas stay quiet unless asked."""
    import datasets
    import transformers

    level = args.get_process_log_level()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, level=level
    )
    logging.getLogger("lmkit").setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(max(level, logging.WARNING))


def log_startup(args: TrainingArguments, *dataclasses: Any) -> None:
    """Log the resolved configuration, package versions and device, on the main process only."""
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
        "device: %s, world size %d, bf16 %s, threads %d", args.device, args.world_size, args.bf16, torch.get_num_threads()
    )
    for group in dataclasses:
        logger.info("%s: %s", type(group).__name__, {k: v for k, v in vars(group).items() if not k.startswith("_")})


def check_output_dir(args: TrainingArguments) -> None:
    """Refuse to train into a dir that holds a finished model, unless resuming or ``--overwrite_output_dir``."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise LMKitError(f"--output_dir {out} exists and is not a directory")
    if args.resume_from_checkpoint or getattr(args, "overwrite_output_dir", False):
        return
    finished = [name for name in FINISHED_MODEL_FILES if (out / name).exists()]
    if finished:
        raise LMKitError(
            f"--output_dir {out} already holds a finished model ({finished[0]}); pass --overwrite_output_dir to "
            "replace it, --resume_from_checkpoint auto to continue, or choose another --output_dir"
        )


def resolve_resume_checkpoint(args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint auto`` -> latest checkpoint in the output dir (None when there is none)."""
    value = args.resume_from_checkpoint
    if not value:
        return None
    if value != "auto":
        if not Path(value).is_dir():
            raise LMKitError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
        return value
    out = Path(args.output_dir)
    candidates = [p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    if not candidates:
        logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting fresh", out)
        return None
    latest = max(candidates, key=lambda p: int(p.name.split("-")[-1]))
    logger.info("resuming from %s", latest)
    return str(latest)


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
        total += param.numel()
    return total


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
