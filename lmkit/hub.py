"""Checkpoints in and out: load a trained model, export a Hub-ready folder (model card, loss curve), upload it.

An export holds everything someone without lmkit needs: safetensors weights, ``config.json``, the tokenizer,
``generation_config.json``, a ``README.md`` model card and ``loss_curve.png``. In the ``lmkit`` format the config
carries an ``auto_map`` and the two model files sit beside the weights (``trust_remote_code=True``), written by
``save_pretrained`` as for every lmkit save (see ``lmkit/__init__.py``); in the ``llama`` format the same weights load as transformers' native ``LlamaForCausalLM``. The upload token comes from
``HF_TOKEN`` or the saved login and is passed straight to `huggingface_hub`, never logged or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lmkit.checkpoint import MODEL_WEIGHTS, PICKLE_WEIGHTS, safetensors_problem
from lmkit.errors import LMKitError
from lmkit.modeling import LMConfig, LMForCausalLM

logger = logging.getLogger(__name__)

WEIGHT_FILES = (*MODEL_WEIGHTS, *PICKLE_WEIGHTS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What an export may contain: an existing --export_dir holding anything else is not ours to clear.
EXPORT_FILE = re.compile(r"^[\w.-]+\.(safetensors|json|py|md|png|txt|model|jinja)$")
EXPORTS_ROOT = Path("exports")
MERGED_DIR = "merged"  # where finetune --merge_lora writes the merged model, inside the adapter's folder
EVAL_FILES = ("evaluation.json", "eval_results.json")  # lmkit's evaluate.py, then the Trainer's final eval


# ---------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------


def local_path(spec: str) -> Path | None:
    """Where a model or tokenizer argument names a local path, that path; None for a hub id.

    The one rule for "folder or hub id?": a path that exists, or that looks like one (starts with ``.``, ``/`` or
    ``~``, or has more than one ``/``, which no hub id has), is local, whether or not it exists.
    """
    path = Path(spec).expanduser()
    return path if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 else None


def check_model_dir(spec: str) -> Path | None:
    """The local model folder ``spec`` names, checked for config, weights and tokenizer; None for a hub id."""
    path = local_path(spec)
    if path is None:
        return None
    if path.is_file():
        raise LMKitError(f"--model {spec}: a file, not a model folder")
    if not path.is_dir():
        raise LMKitError(f"--model {spec}: no such model folder")
    if problem := lora_adapter_problem(path):
        raise LMKitError(f"--model {spec}: {problem}")
    if not (path / "config.json").is_file():
        raise LMKitError(
            f"--model {spec}: no config.json, not a saved model folder (a training run writes one at the end)"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise LMKitError(f"--model {spec}: no weights in the folder (expected model.safetensors)")
    if (path / "model.safetensors").is_file() and (problem := safetensors_problem(path / "model.safetensors")):
        raise LMKitError(f"--model {spec}: model.safetensors is corrupted ({problem})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LMKitError(f"--model {spec}: no tokenizer in the folder (expected tokenizer.json)")
    return path


def lora_adapter_problem(path: Path) -> str | None:
    """Why the folder ``path`` is no model to load when it holds only a LoRA adapter (a `--use_lora` run's output):
    what to use instead, its merged model or a merge into the base. None for any other folder."""
    if (path / "config.json").is_file() or not (path / "adapter_config.json").is_file():
        return None
    merged = path / MERGED_DIR
    if (merged / "config.json").is_file():
        return f"holds a LoRA adapter, not a full model; use {merged}, the merged model"
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    into = f"its base model ({base})" if base else "its base"
    return f"holds a LoRA adapter, not a full model; merge it into {into} first (finetune --merge_lora true)"


def load_config(spec: str, trust_remote_code: bool = False, flag: str = "--model") -> PretrainedConfig:
    """The config of the model at ``spec`` (a folder already checked, or a hub id) alone, no weights: enough to
    check flags against the model before loading it. A failure raises `LMKitError` naming ``flag``."""
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise LMKitError(
            f"{flag} {spec}: could not load its config ({type(err).__name__}: {_first_line(err)})"
        ) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def load_checkpoint(
    spec: str, dtype: str = "auto", trust_remote_code: bool = False, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a folder or hub id, in eval mode on ``device`` (default: the
    accelerator when there is one). lmkit checkpoints load without remote code: importing lmkit registers them.
    """
    check_model_dir(spec)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as err:
        raise LMKitError(f"--model {spec}: could not load ({type(err).__name__}: {_first_line(err)})") from err
    # from_pretrained fills absent or mis-shaped tensors with random values and only warns: refuse instead.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        first = missing[0] if missing else mismatched[0][0]
        raise LMKitError(
            f"--model {spec}: the weights do not fit the architecture in config.json "
            f"({len(missing)} missing, {len(mismatched)} mis-shaped tensors; first: {first})"
        )
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = accelerator or "cpu"
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def default_export_dir(repo_id: str, fmt: str) -> Path:
    """``exports/<repo name>`` relative to the working directory; for the llama format ``-llama`` is appended
    unless the name already ends with it, so the two formats of one repo id do not share a folder."""
    name = repo_id.split("/")[-1]
    return EXPORTS_ROOT / (f"{name}-llama" if fmt == "llama" and not name.endswith("-llama") else name)


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise LMKitError(f"--repo_id {repo_id!r} is not a valid repository id ({err})") from err
    if repo_id.count("/") > 1 or not all(repo_id.split("/")):
        raise LMKitError(f"--repo_id {repo_id!r} is not a valid repository id (use 'namespace/name')")


def to_llama(model: LMForCausalLM) -> LlamaForCausalLM:
    """The same network as transformers' native `LlamaForCausalLM`: a config translation, the weights as they are
    (shared with ``model``, not copied). It runs in memory as well as it saves."""
    c: LMConfig = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=c.attention_dropout,
        use_cache=True,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        dtype=model.dtype,
        attn_implementation=c._attn_implementation,  # a runtime choice: config.json does not record it
    )
    with torch.device("meta"):  # no initial weights drawn: the model's own are assigned below
        llama = LlamaForCausalLM(config)
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = llama.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (c.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LMKitError(f"--format llama: weights do not map onto Llama (missing {missing}, unexpected {unexpected})")
    llama.tie_weights()
    # The rotary frequencies are computed buffers, not weights: the meta ones hold no data, so compute them.
    llama.model.rotary_emb = LlamaRotaryEmbedding(config).to(model.device)
    llama.generation_config = model.generation_config
    return llama.eval()


def prepare_export_dir(export_dir: Path, model_dir: Path | None) -> None:
    """Create ``export_dir``, or empty it when it holds an earlier export (so no stale file gets uploaded)."""
    if model_dir is not None and export_dir.resolve() in (model_dir.resolve(), *model_dir.resolve().parents):
        raise LMKitError(f"--export_dir {export_dir} is the model folder or holds it; choose another folder")
    if export_dir.exists():
        if not export_dir.is_dir():
            raise LMKitError(f"--export_dir {export_dir} exists and is not a directory")
        foreign = [p.name for p in export_dir.iterdir() if not (p.is_file() and EXPORT_FILE.match(p.name))]
        if foreign:
            raise LMKitError(
                f"--export_dir {export_dir} is not empty and holds {foreign[0]!r}, which an export never writes; "
                "choose an empty or new folder"
            )
        for p in export_dir.iterdir():
            p.unlink()
    export_dir.mkdir(parents=True, exist_ok=True)


def export_model(
    model_spec: str,
    export_dir: Path,
    repo_id: str,
    fmt: str = "lmkit",
    license: str = "apache-2.0",  # noqa: A002
    datasets: list[str] | None = None,
    language: list[str] | None = None,
) -> list[Path]:
    """Write the Hub-ready folder for ``model_spec`` and return its files (sorted)."""
    model_dir = check_model_dir(model_spec)
    model, tokenizer = load_checkpoint(model_spec, device="cpu")
    if fmt == "llama" and not isinstance(model, LMForCausalLM):
        raise LMKitError(f"--format llama converts lmkit models; {model_spec} is a {type(model).__name__}")
    prepare_export_dir(export_dir, model_dir)

    model.config.use_cache = True  # training saves use_cache=False; a published model should generate fast
    (to_llama(model) if fmt == "llama" else model).save_pretrained(export_dir)
    tokenizer.save_pretrained(export_dir)

    run = RunRecord.read(model_dir) if model_dir is not None else RunRecord()
    has_curve = plot_loss_curve(run.log_history, export_dir / "loss_curve.png", run.token_level)
    card = build_model_card(model, repo_id, fmt, run, has_curve, license, datasets, language)
    card.save(export_dir / "README.md")
    files = sorted(p for p in export_dir.iterdir() if p.is_file())
    logger.info("exported %s (%s format) to %s: %s", model_spec, fmt, export_dir, ", ".join(p.name for p in files))
    return files


# ---------------------------------------------------------------------------------------------------------------
# What the training run left behind: logs, metrics, hyperparameters
# ---------------------------------------------------------------------------------------------------------------


RUN_RECORD = "lmkit_run.json"  # the lineage a training run leaves beside its model: every stage, oldest first
STAGE_NAMES = {"pretrain": "pretraining", "finetune": "supervised fine-tuning (SFT)", "dpo": "preference tuning"}
PREFERENCE_LOSSES = {"sigmoid": "DPO", "ipo": "IPO", "simpo": "SimPO", "orpo": "ORPO"}
_STAGE_METRICS = re.compile(r"^(train_loss|eval_.*(loss|perplexity|bits_per_byte|accuracies|margins))$")


def stage_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a stage record keeps: the train loss and the final evaluation's quality numbers (finite, rounded
    to 6 significant digits); not speeds, runtimes or epochs."""
    return {
        k: float(f"{v:.6g}")
        for k, v in metrics.items()
        if _STAGE_METRICS.match(k) and isinstance(v, (int, float)) and math.isfinite(v)
    }


def read_stages(model_dir: Path) -> list[dict[str, Any]]:
    """The stages that made the model in ``model_dir``, oldest first: its `RUN_RECORD` (a merged LoRA export in
    ``<run>/merged`` takes its run's), else one stage rebuilt from a run without one (its trainer state and eval
    results); [] for a folder no training run wrote."""
    for folder in (model_dir, model_dir.parent) if model_dir.name == "merged" else (model_dir,):
        if (folder / RUN_RECORD).is_file():
            return list(json.loads((folder / RUN_RECORD).read_text()).get("stages", []))
    if not (model_dir / "trainer_state.json").is_file():
        return []
    state = json.loads((model_dir / "trainer_state.json").read_text())
    results = model_dir / "eval_results.json"
    metrics = json.loads(results.read_text()) if results.is_file() else {}
    return [{"recipe": None, "output_dir": str(model_dir), "steps": state.get("global_step"),
             "metrics": stage_metrics(metrics)}]  # fmt: skip


def parent_stages(starting_point: str | None) -> list[dict[str, Any]]:
    """The stages before a run that started from ``starting_point``: a local folder's `read_stages`, a hub model as
    one stage naming it, nothing for a run from scratch."""
    if not starting_point:
        return []
    path = local_path(starting_point)
    if path is None:
        return [{"recipe": None, "model": starting_point}]
    return read_stages(path)


def write_run_record(output_dir: str | Path, stage: dict[str, Any]) -> Path:
    """Write ``output_dir``/`RUN_RECORD`: the parent's stages (read from the run's ``starting_point``, copied so the
    lineage survives the parent folder) followed by ``stage``."""
    stages = [*parent_stages(stage.get("starting_point")), stage]
    path = Path(output_dir) / RUN_RECORD
    path.write_text(json.dumps({"stages": stages}, indent=2) + "\n")
    return path


@dataclasses.dataclass
class RunRecord:
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics_source: str | None = None
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def read(cls, model_dir: Path) -> RunRecord:
        record = cls()
        state_file = model_dir / "trainer_state.json"
        if state_file.is_file():
            record.state = json.loads(state_file.read_text())
            record.log_history = record.state.get("log_history", [])
        for name in EVAL_FILES:
            if (model_dir / name).is_file():
                record.metrics = json.loads((model_dir / name).read_text())
                record.metrics_source = name
                break
        record.hyperparameters = _training_hyperparameters(model_dir / "training_args.bin")
        record.stages = read_stages(model_dir)
        return record

    @property
    def token_level(self) -> bool:
        """Whether the last stage's training loss is a token cross-entropy (not a preference loss)."""
        return not self.stages or self.stages[-1].get("recipe") != "dpo"

    def eval_metrics(self) -> dict[str, float]:
        """loss / perplexity / bits_per_byte from lmkit's evaluation.json or the Trainer's eval_results.json (the
        latter only when the run's loss is a token cross-entropy: a preference loss is no language-model metric)."""
        m = self.metrics
        if self.metrics_source == "eval_results.json" and not self.token_level:
            return {}
        out = {}
        for key in ("loss", "perplexity", "bits_per_byte"):
            value = m.get(key, m.get(f"eval_{key}"))
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = float(value)
        return out


_HYPERPARAMETERS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16", "seed",
    "optim",
)  # fmt: skip
_SAFE_MODULES = ("transformers.", "accelerate.", "lmkit.", "trl.", "peft.")


def _training_hyperparameters(path: Path) -> dict[str, Any]:
    """Selected fields of the pickled TrainingArguments, unpickled with torch's weights-only loader.

    Only classes (argument dataclasses, enums) from the training libraries are allowed, never functions, so a
    tampered file cannot run code; anything else leaves the card without the hyperparameter table.
    """
    if not path.is_file():
        return {}
    allowed: list[type] = []
    for _ in range(32):
        try:
            with torch.serialization.safe_globals(allowed):
                args = torch.load(path, weights_only=True)
            break
        except Exception as err:  # noqa: BLE001 -- any failure just drops the table
            match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            name = match.group(1) if match else ""
            module, _, attr = name.rpartition(".")
            obj = None
            if module.startswith(_SAFE_MODULES):
                with contextlib.suppress(ImportError, AttributeError):
                    obj = getattr(importlib.import_module(module), attr)
            if not isinstance(obj, type):
                logger.warning("%s: not read (%s); the model card omits the hyperparameters", path.name, name or err)
                return {}
            allowed.append(obj)
    else:
        return {}
    out = {}
    for key in _HYPERPARAMETERS:
        value = getattr(args, key, None)
        out[key] = value.value if isinstance(value, enum.Enum) else value
    return out


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path, token_level: bool = True) -> bool:
    """Training (and eval) loss against optimizer step, from the Trainer's log history, as a PNG. False if empty.
    ``token_level``: the loss is a cross-entropy in nats/token (else a preference loss, labelled as such)."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), marker="." if len(train) < 30 else None, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)" if token_level else "preference loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def build_model_card(
    model: PreTrainedModel,
    repo_id: str,
    fmt: str,
    run: RunRecord,
    has_curve: bool,
    license: str,  # noqa: A002
    datasets: list[str] | None,
    language: list[str] | None,
) -> ModelCard:
    """A `ModelCard` with YAML metadata (model-index carries the eval metrics) and a body describing the model:
    usage, architecture, the training stages oldest first (each with its data and metrics), evaluation, loss curve."""
    name = repo_id.split("/")[-1]
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        tags=["lmkit", "causal-lm", "text-generation", "llama" if fmt == "llama" else "custom_code"],
        datasets=datasets,
        pipeline_tag="text-generation",
        model_name=name,
        eval_results=_eval_results(run, datasets) or None,
    )
    lines = [
        f"# {name}",
        "",
        f"A causal language model trained with lmkit ({_stage_path(run.stages)}), {params:,} parameters.",
        *_usage_lines(repo_id, fmt),
        *_architecture_lines(model.config, fmt, params),
        *_training_lines(run, datasets),
        *_evaluation_lines(run, datasets),
    ]
    if has_curve:
        lines += ["", "## Loss curve", "", "![training loss](loss_curve.png)"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _eval_results(run: RunRecord, datasets: list[str] | None) -> list[EvalResult]:
    metrics = run.eval_metrics()
    names = (("loss", "loss (nats/token)"), ("perplexity", "perplexity"), ("bits_per_byte", "bits per byte"))
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=(datasets or ["custom"])[0],
            dataset_name=_eval_dataset_name(run, datasets),
            dataset_split="validation",
            metric_type=key,
            metric_name=label,
            metric_value=round(metrics[key], 4),
        )
        for key, label in names
        if key in metrics
    ]


def _stage_path(stages: list[dict[str, Any]]) -> str:
    """``"pretrain -> finetune -> dpo (DPO)"``; ``"training not recorded"`` without stages."""
    parts = [_stage_label(stage) for stage in stages]
    return " -> ".join(parts) if parts else "training not recorded"


def _stage_label(stage: dict[str, Any]) -> str:
    recipe = stage.get("recipe")
    if recipe is None:
        return f"`{stage['model']}`" if stage.get("model") else "an earlier run"
    loss = stage.get("loss_type")
    return f"{recipe} ({PREFERENCE_LOSSES.get(loss, loss)})" if loss else recipe


def _usage_lines(repo_id: str, fmt: str) -> list[str]:
    trust = ", trust_remote_code=True" if fmt == "lmkit" else ""
    return [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        # the tokenizer too: transformers 5's AutoTokenizer reads config.json, whose auto_map otherwise prompts
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{trust})',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{trust})',
        'inputs = tokenizer("ROMEO:", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=100, do_sample=True, temperature=0.8, top_k=50)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "",
        f'generator = pipeline("text-generation", model="{repo_id}"{trust})',
        "```",
    ]


def _architecture_lines(c: PretrainedConfig, fmt: str, params: int) -> list[str]:
    arch = (
        "transformers' native `LlamaForCausalLM` (exported from lmkit; no remote code)"
        if fmt == "llama"
        else "lmkit `LMForCausalLM` (code ships in this repository; load with `trust_remote_code=True`)"
    )
    return [
        "",
        "## Architecture",
        "",
        f"{arch}: a pre-norm decoder with RMSNorm, rotary position embeddings, SwiGLU MLP and grouped-query attention.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {params:,} |",
        f"| layers | {c.num_hidden_layers} |",
        f"| hidden size | {c.hidden_size} |",
        f"| MLP size | {c.intermediate_size} |",
        f"| attention heads (key/value) | {c.num_attention_heads} ({c.num_key_value_heads}) |",
        f"| context length | {c.max_position_embeddings} |",
        f"| vocabulary | {c.vocab_size} |",
        f"| rope theta | {c.rope_parameters.get('rope_theta')} |",
        f"| tied embeddings | {c.tie_word_embeddings} |",
    ]


def _training_lines(run: RunRecord, datasets: list[str] | None) -> list[str]:
    lines = ["", "## Training data", ""]
    if datasets:
        lines += [", ".join(f"`{d}`" for d in datasets)]
    elif any(stage.get("data") for stage in run.stages or []):
        lines += ["Each stage's data is listed under Training stages (pass `--datasets` to publish.py to link hub "
                  "datasets in the card's metadata)."]  # fmt: skip
    else:
        lines += ["Not recorded (pass `--datasets` to publish.py)."]
    if run.state:
        tokens = run.state.get("num_input_tokens_seen")
        lines += ["", f"Tokens seen: {tokens:,}." if tokens else "Tokens seen: not recorded."]
        lines += [f"Optimizer steps: {run.state.get('global_step', 0):,}."]
    if run.stages:
        lines += [
            "",
            "## Training stages",
            "",
            "Oldest first; each stage started from the model of the one above.",
            "",
        ]
        lines += ["| # | stage | started from | data | steps | final metrics |", "|---|---|---|---|---|---|"]
        lines += [_stage_row(i, stage) for i, stage in enumerate(run.stages, 1)]
    if run.hyperparameters:
        lines += ["", "## Training hyperparameters", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in run.hyperparameters.items() if v is not None]
    return lines


def _stage_row(index: int, stage: dict[str, Any]) -> str:
    if stage.get("recipe") is None and stage.get("model"):
        return f"| {index} | `{stage['model']}` (hub model) | | | | |"
    recipe = stage.get("recipe")
    what = STAGE_NAMES.get(recipe, recipe or "an earlier run (no lmkit record)")
    if stage.get("loss_type"):
        what += f", {PREFERENCE_LOSSES.get(stage['loss_type'], stage['loss_type'])} (beta {stage.get('beta')})"
    start = f"`{stage['starting_point']}`" if stage.get("starting_point") else "scratch"
    data = ", ".join(f"`{d}`" for d in stage.get("data") or []) or "not recorded"
    steps = f"{stage['steps']:,}" if isinstance(stage.get("steps"), int) else ""
    if stage.get("tokens_seen"):
        steps += f" ({stage['tokens_seen']:,} tokens)"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in (stage.get("metrics") or {}).items())
    return f"| {index} | {what} | {start} | {data} | {steps} | {metrics} |"


def _evaluation_lines(run: RunRecord, datasets: list[str] | None) -> list[str]:
    metrics = run.eval_metrics()
    if not metrics:
        return ["", "## Evaluation", "", "No evaluation recorded."]
    lines = ["", "## Evaluation", "", f"On {_eval_dataset_name(run, datasets)} (from `{run.metrics_source}`):", ""]
    return lines + ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in metrics.items())]


def _eval_dataset_name(run: RunRecord, datasets: list[str] | None) -> str:
    files = run.metrics.get("files")
    if files:
        return ", ".join(Path(f).name for f in files)
    return f"{datasets[0]} (held-out split)" if datasets else "held-out split of the training data"


# ---------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------


def resolve_token() -> str:
    """The Hub token from ``HF_TOKEN`` or the saved login; never logged."""
    try:
        token = get_token()
    except Exception as err:  # noqa: BLE001 -- e.g. a failed OIDC exchange
        raise LMKitError(f"could not read a Hugging Face token ({type(err).__name__})") from err
    if not token:
        raise LMKitError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or pass --dry_run)")
    return token


def upload(
    export_dir: Path,
    repo_id: str,
    token: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """create_repo + upload_folder; returns the commit URL. Any failure is a one-line `LMKitError` (no token in it)."""
    api = HfApi(token=token)
    message = commit_message or f"Upload {repo_id.split('/')[-1]} trained with lmkit"
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo.repo_id, folder_path=export_dir, revision=revision, commit_message=message
        )
    except Exception as err:  # noqa: BLE001 -- network, auth, permission: all end the same way for the user
        reason = " ".join(str(err).replace(token, "***").split())[:300]
        raise LMKitError(
            f"upload to {api.endpoint}/{repo_id} failed ({type(err).__name__}: {reason}); "
            f"the exported folder is intact at {export_dir}"
        ) from err
    return str(info.commit_url)
