"""Checks and helpers for multi-process runs (DDP, DeepSpeed ZeRO, FSDP, multi-node) under `accelerate launch`.

- `validate_distributed(args)`: called by a recipe right after parsing, before data or model are built. Every
  contradiction between the DeepSpeed config and the training arguments becomes one `LMKitError`, instead of a
  traceback from inside `deepspeed.initialize` after the data was tokenized.
- `check_launch_config(path, ...)`: the same idea one step earlier, for what only the launcher sees (a multi-node
  config without ``main_process_ip`` makes torchrun wait for a rendezvous that never comes).
- `main_process_first(args, desc)`: the main process does long work (tokenizing) first while the others wait
  for a marker file, outside any collective, so no ``--ddp_timeout`` runs out while they wait.
- `prebuild_deepspeed_ops()`: compile, once and in one process, the C++ ops DeepSpeed would otherwise JIT-build
  inside every rank of the first run.

Command line (run before ``accelerate launch``)::

    python -m lmkit.distributed check --config_file accelerate_configs/multi_node.yaml --main_process_ip 10.0.0.1
    python -m lmkit.distributed prebuild
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from lmkit.errors import LMKitError, RelayedError, main_entry

logger = logging.getLogger(__name__)

ZERO_STAGES = (0, 1, 2, 3)
# A torch extension build holds `<build dir>/lock` while it compiles (torch.utils.file_baton.FileBaton); a process
# killed mid-build leaves it behind and every later load of that op polls it forever. No op takes this long.
STALE_LOCK_SECONDS = 15 * 60
# DeepSpeed schedulers and the `--lr_scheduler_type` each one stands in for.
DS_SCHEDULER_EQUIVALENT = {"WarmupLR": "constant_with_warmup", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


# -- DeepSpeed config ---------------------------------------------------------------------------------------------
def load_deepspeed_config(args: Any) -> tuple[str, dict[str, Any]] | None:
    """The DeepSpeed config this run will use and where it came from, or None when DeepSpeed is off.

    Sources, in the Trainer's order: ``--deepspeed`` (a JSON path or a dict), then an accelerate config's
    ``deepspeed_config_file`` (env ``ACCELERATE_DEEPSPEED_CONFIG_FILE``), then accelerate's inline DeepSpeed keys.
    """
    if args.deepspeed:
        if isinstance(args.deepspeed, dict):
            return "--deepspeed", args.deepspeed
        return f"--deepspeed {args.deepspeed}", _read_json(args.deepspeed, "--deepspeed")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        return f"deepspeed_config_file {path}", _read_json(path, "deepspeed_config_file")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    return "accelerate deepspeed_config", {"zero_optimization": {"stage": _int_or_str(stage)}}


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LMKitError(f"{what} {path}: no such file (paths in accelerate_configs/ are relative to the repo root)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LMKitError(f"{what} {path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise LMKitError(f"{what} {path}: expected a JSON object")
    return config


def _int_or_str(value: str) -> int | str:
    return int(value) if value.lstrip("-").isdigit() else value


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _fixed(value: Any) -> bool:
    return value is not None and value != "auto"


def deepspeed_config_problems(config: dict[str, Any], args: Any, world_size: int, source: str) -> list[str]:
    """Every way ``config`` contradicts the training arguments, as messages naming both sides."""
    problems = []
    stage = _get(config, "zero_optimization.stage")
    if stage is not None and (isinstance(stage, bool) or stage not in ZERO_STAGES):
        problems.append(f"{source}: zero_optimization.stage {stage!r} is not a ZeRO stage (0, 1, 2 or 3)")

    # The fields the Trainer fills when they are "auto" (transformers' HfTrainerDeepSpeedConfig.trainer_config_process).
    pairs = [
        ("train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "per_device_train_batch_size"),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps, "gradient_accumulation_steps"),
        ("gradient_clipping", args.max_grad_norm, "max_grad_norm"),
        ("optimizer.params.lr", args.learning_rate, "learning_rate"),
        ("optimizer.params.weight_decay", args.weight_decay, "weight_decay"),
        ("optimizer.params.eps", args.adam_epsilon, "adam_epsilon"),
        ("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "adam_beta1/--adam_beta2"),
        ("bf16.enabled", bool(args.bf16), "bf16"),
        ("fp16.enabled", bool(args.fp16), "fp16"),
    ]
    for key, ours, flag in pairs:
        theirs = _get(config, key)
        if _fixed(theirs) and not _same(theirs, ours):
            problems.append(
                f'{source} sets {key} {theirs} but --{flag} is {ours} (use "auto" or pass --{flag} {theirs})'
            )

    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    total = config.get("train_batch_size")
    if _fixed(total):
        if not isinstance(total, int) or total <= 0:
            problems.append(f"{source}: train_batch_size {total!r} is not a positive integer")
        elif total % world_size:
            problems.append(
                f"{source}: train_batch_size {total} is not divisible by the world size {world_size} "
                f'(launch a number of processes that divides it, or use "auto")'
            )
        elif total != world_size * micro * accum:
            problems.append(
                f"{source} sets train_batch_size {total} but {world_size} processes x --per_device_train_batch_size "
                f"{micro} x --gradient_accumulation_steps {accum} = {world_size * micro * accum}"
            )

    scheduler = _get(config, "scheduler.type")
    if scheduler is not None and DS_SCHEDULER_EQUIVALENT.get(scheduler) != str(args.lr_scheduler_type).split(".")[-1]:
        problems.append(
            f"{source} sets scheduler {scheduler} but --lr_scheduler_type is {args.lr_scheduler_type}; remove the "
            "'scheduler' section so the Trainer's schedule is used"
        )

    offload = _get(config, "zero_optimization.offload_optimizer.device")
    if (
        offload in ("cpu", "nvme")
        and "optimizer" not in config
        and config.get("zero_force_ds_cpu_optimizer", True) is not False
    ):
        problems.append(
            f"{source} offloads the optimizer without an 'optimizer' section: DeepSpeed refuses the Trainer's AdamW "
            'there unless "zero_force_ds_cpu_optimizer": false (or add an "optimizer" section for DeepSpeedCPUAdam)'
        )
    if stage == 3 and _get(config, "zero_optimization.stage3_gather_16bit_weights_on_model_save") is not True:
        problems.append(
            f"{source}: ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save true saves an "
            "empty model (each rank only holds a shard); set it to true"
        )
    return problems


def _same(theirs: Any, ours: Any) -> bool:
    if isinstance(theirs, list | tuple) and isinstance(ours, list | tuple):
        return len(theirs) == len(ours) and all(_same(a, b) for a, b in zip(theirs, ours, strict=True))
    if isinstance(theirs, bool) or isinstance(ours, bool):
        return bool(theirs) == bool(ours)
    if isinstance(theirs, int | float) and isinstance(ours, int | float):
        return abs(theirs - ours) <= 1e-12 * max(1.0, abs(ours))
    return theirs == ours


# -- the recipe's check -------------------------------------------------------------------------------------------
def validate_distributed(args: Any, world_size: int | None = None) -> None:
    """Raise one `LMKitError` listing every problem with this distributed launch; call right after parsing.

    Checks the DeepSpeed config (``--deepspeed`` or the accelerate config's) against the training arguments:
    fixed values that differ from the flags, an unknown ZeRO stage, a ``train_batch_size`` the world size does
    not divide, a scheduler other than ``--lr_scheduler_type``, ZeRO-3 saves that would be empty, offload without
    an optimizer DeepSpeed accepts; and a stale build lock that would hang DeepSpeed's op loading. (A multi-node
    launch without ``main_process_ip`` never reaches the recipe: see `check_launch_config`.)

    Args:
        args: the parsed `TrainingArguments`.
        world_size: processes in the run; default ``args.world_size`` (what the launcher started).
    """
    world_size = args.world_size if world_size is None else world_size
    problems = []
    loaded = load_deepspeed_config(args)
    if loaded is not None:
        source, config = loaded
        problems += deepspeed_config_problems(config, args, world_size, source)
        problems += [_stale_lock_message(lock) for lock in stale_build_locks(deepspeed_jit_ops(config))]
    if problems:
        raise LMKitError("; ".join(problems))


# -- the launcher's check -----------------------------------------------------------------------------------------
def check_launch_config(
    config_file: str | Path,
    main_process_ip: str | None = None,
    machine_rank: int | None = None,
    num_machines: int | None = None,
    num_processes: int | None = None,
) -> dict[str, Any]:
    """Check an accelerate config (plus the ``accelerate launch`` flags that override it) before launching.

    Returns the merged config; raises one `LMKitError` listing every problem.
    """
    path = Path(config_file)
    if not path.is_file():
        raise LMKitError(f"--config_file {path}: no such file")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise LMKitError(f"--config_file {path}: not valid YAML ({type(err).__name__})") from err
    overrides = {
        "main_process_ip": main_process_ip,
        "machine_rank": machine_rank,
        "num_machines": num_machines,
        "num_processes": num_processes,
    }
    config.update({k: v for k, v in overrides.items() if v is not None})
    problems = []
    machines, processes = int(config.get("num_machines", 1)), int(config.get("num_processes", 1))
    if machines > 1 and not config.get("main_process_ip"):
        problems.append(
            f"--config_file {path}: {machines} machines but no main_process_ip; pass --main_process_ip "
            "(the IP of machine 0, reachable from every machine)"
        )
    if processes % machines:
        problems.append(f"--config_file {path}: num_processes {processes} is not divisible by num_machines {machines}")
    rank = int(config.get("machine_rank", 0))
    if not 0 <= rank < machines:
        problems.append(f"--config_file {path}: machine_rank {rank} is outside 0..{machines - 1}")
    ds_file = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if config.get("distributed_type") == "DEEPSPEED" and ds_file:
        try:
            stage = _get(_read_json(ds_file, "deepspeed_config_file"), "zero_optimization.stage")
        except LMKitError as err:
            problems.append(f"--config_file {path}: {err}")
        else:
            if stage is not None and (isinstance(stage, bool) or stage not in ZERO_STAGES):
                problems.append(f"deepspeed_config_file {ds_file}: zero_optimization.stage {stage!r} is not 0-3")
    if problems:
        raise LMKitError("; ".join(problems))
    return config


# -- DeepSpeed's JIT-built ops ------------------------------------------------------------------------------------
def deepspeed_jit_ops(config: dict[str, Any] | None = None) -> list[str]:
    """Names of the DeepSpeed op builders a run with ``config`` loads on this machine's accelerator.

    On the CPU accelerator every run loads the shared-memory comm op (`deepspeed.comm.torch.build_shm_op`);
    a DeepSpeed optimizer section adds DeepSpeed's Adam: CPU Adam when offloading, fused Adam otherwise.
    """
    from deepspeed.accelerator import get_accelerator

    names = []
    if get_accelerator().device_name() == "cpu":
        names.append("ShareMemCommBuilder")
    optimizer = str(_get(config or {}, "optimizer.type") or "").lower()
    if optimizer in ("adam", "adamw"):
        offload = _get(config or {}, "zero_optimization.offload_optimizer.device") in ("cpu", "nvme")
        names.append("CPUAdamBuilder" if offload else "FusedAdamBuilder")
    return names


def _builder(name: str) -> Any:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder(name)


def extension_build_dir(op_name: str) -> Path:
    """Where torch JIT-builds the extension ``op_name`` (torch.utils.cpp_extension._get_build_directory, no mkdir)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accel = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accel = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accel = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accel}")
    return Path(root) / op_name


def stale_build_locks(builder_names: list[str], older_than_s: float = STALE_LOCK_SECONDS) -> list[Path]:
    """Build locks of these ops left by an interrupted build (older than any real build takes)."""
    stale = []
    for name in builder_names:
        builder = _builder(name)
        if builder is None:
            continue
        lock = extension_build_dir(builder.name) / "lock"
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > older_than_s:
            stale.append(lock)
    return stale


def _stale_lock_message(lock: Path) -> str:
    return (
        f"{lock} is left from an interrupted DeepSpeed op build and would make every rank wait forever; "
        f"delete it (rm {lock}) or run `python -m lmkit.distributed prebuild`"
    )


def prebuild_deepspeed_ops(builder_names: list[str] | None = None) -> list[str]:
    """JIT-build DeepSpeed's ops in this one process so that launched ranks only load them.

    Without this the first run compiles inside the ranks (one builds, the others poll its lock), which costs a
    minute or more inside a timed launch, and a rank killed mid-build leaves a lock on which every later run
    hangs. Call it before ``accelerate launch`` (the test suite's fixture, the Docker build, a cluster's setup
    step). Returns the paths of the loaded ops.

    Args:
        builder_names: DeepSpeed op builder class names; default `deepspeed_jit_ops()` for this machine.
    """
    names = deepspeed_jit_ops() if builder_names is None else builder_names
    stale = stale_build_locks(names)
    if stale:
        raise LMKitError("; ".join(_stale_lock_message(lock) for lock in stale))
    loaded = []
    for name in names:
        builder = _builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            logger.info("DeepSpeed op %s does not apply to this machine; skipped", name)
            continue
        start = time.perf_counter()
        module = builder.load(verbose=False)
        logger.info("DeepSpeed op %s ready in %.1fs", builder.name, time.perf_counter() - start)
        loaded.append(getattr(module, "__file__", str(module)))
    return loaded


# -- the main process first, without a collective timeout ---------------------------------------------------------

WAIT_POLL_SECONDS = 1.0
WAIT_LOG_SECONDS = 60.0


@contextlib.contextmanager
def main_process_first(args: Any, desc: str = "work") -> Iterator[None]:
    """`TrainingArguments.main_process_first` (local: each node's main process first) without its timeout.

    transformers parks the other ranks in ``dist.barrier()`` while the main process works, and that barrier fails
    after ``--ddp_timeout`` (30 minutes by default; NCCL's watchdog may kill the job), however long tokenizing a
    large corpus legitimately takes. Here they poll for a marker file the main process writes when it is done (in
    this node's temp dir, named by a token rank 0 draws), logging every minute, and only then meet it in a barrier
    that is short because everyone has arrived. If the main process fails, they raise its error; if it dies
    without a word, they raise an `LMKitError` naming the marker file. A single process just runs the body.
    """
    dist = torch.distributed
    if getattr(args, "world_size", 1) <= 1 or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    token = [uuid.uuid4().hex]  # instant collectives: every rank reaches this line together
    dist.broadcast_object_list(token, src=0)
    peers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), args.local_process_index, os.getpid()))
    main_pid = next(pid for host, local, pid in peers if host == socket.gethostname() and local == 0)
    marker = Path(tempfile.gettempdir()) / f"lmkit-{token[0]}-{desc.replace(' ', '_')}.done"
    if args.local_process_index == 0:
        try:
            yield
        except BaseException as err:
            kind = USER_ERROR_MARK if isinstance(err, LMKitError) else f"error: {type(err).__name__}: "
            _write_marker(marker, kind + " ".join(str(err).split()))
            raise
        _write_marker(marker, "done")
        dist.barrier()
        marker.unlink(missing_ok=True)
        return
    _wait_for_marker(marker, main_pid, desc)
    yield
    dist.barrier()


# How a main process that failed on the user's input (an `LMKitError`) starts its marker; the message follows.
USER_ERROR_MARK = f"error: {LMKitError.__name__}: "


def _write_marker(marker: Path, state: str) -> None:
    """Write whole or not at all: a waiting rank that sees the file reads all of it (rename is atomic)."""
    partial = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    partial.write_text(state)
    os.replace(partial, marker)


def _wait_for_marker(marker: Path, main_pid: int, desc: str) -> None:
    start = last_log = time.monotonic()
    while not marker.exists():
        if not _alive(main_pid):
            raise LMKitError(f"{marker}: the main process (pid {main_pid}) ended during {desc} without writing it")
        if time.monotonic() - last_log >= WAIT_LOG_SECONDS:
            last_log = time.monotonic()
            logger.info("waiting for the main process to finish %s (%.0f s so far)", desc, last_log - start)
        time.sleep(WAIT_POLL_SECONDS)
    state = marker.read_text()
    if state.startswith(USER_ERROR_MARK):  # the main process reports the user's error itself
        raise RelayedError(state.removeprefix(USER_ERROR_MARK))
    if state.startswith("error"):
        raise LMKitError(f"{desc} failed on the main process ({marker}: {state})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


# -- command line -------------------------------------------------------------------------------------------------
@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmkit.distributed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check an accelerate config and launch flags before launching")
    check.add_argument("--config_file", required=True)
    check.add_argument("--main_process_ip")
    check.add_argument("--machine_rank", type=int)
    check.add_argument("--num_machines", type=int)
    check.add_argument("--num_processes", type=int)
    build = sub.add_parser("prebuild", help="compile DeepSpeed's JIT ops once, before launching")
    build.add_argument("ops", nargs="*", help="op builder class names (default: what this machine needs)")
    ns = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    if ns.command == "check":
        config = check_launch_config(
            ns.config_file, ns.main_process_ip, ns.machine_rank, ns.num_machines, ns.num_processes
        )
        print(f"ok: {config.get('distributed_type')} on {config.get('num_machines', 1)} machine(s)")
    else:
        for path in prebuild_deepspeed_ops(ns.ops or None):
            print(path)


if __name__ == "__main__":
    main()
