"""Dataclass arguments of the recipes that use a trained model: evaluate.py, generate.py and publish.py.

Parsed by `lmkit.args.parse_args` (``--config FILE.yaml`` plus CLI overrides, CLI wins), like the training recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkit.errors import LMKitError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class CheckpointArguments:
    """Which trained model to load, and how."""

    model: str = field(
        default=None,
        metadata={"help": "Model folder (the --output_dir of a training run) or hub id, with weights and tokenizer."},
    )
    dtype: str = field(
        default="auto", metadata={"help": f"Weights dtype: {', '.join(DTYPES)} (auto: as saved in config.json)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code shipped with a hub checkpoint to run. Off unless you pass it."}
    )
    num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads. None: OMP_NUM_THREADS when the user set it, else every usable core."},
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append("--model is required (a model folder or hub id)")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"--num_threads must be a positive integer, got {self.num_threads}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if problems:
            raise LMKitError("; ".join(problems))


@dataclass
class EvaluationArguments:
    """What to evaluate on and how: held-out files, context length, sliding-window stride."""

    files: list[str] = field(
        default=None,
        metadata={"help": "Held-out files, directories or globs (.txt, .jsonl/.json with a text field, .parquet)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column (JSONL/parquet field) holding the text."})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": "How .txt files split into documents: 'line', 'paragraph' or 'document' (as in training)."},
    )
    context: int | None = field(
        default=None,
        metadata={
            "help": "Tokens of context per prediction window. None: the model's max_position_embeddings. "
            "Use the training --block_size to reproduce the trainer's eval_loss."
        },
    )
    stride: int | None = field(
        default=None,
        metadata={
            "help": "Sliding-window step in tokens (1..context): every token is scored once, with at least "
            "context - stride tokens of context. None: non-overlapping blocks of context + 1 tokens, exactly as "
            "training packs them (the trainer's eval_loss)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    output_file: str | None = field(
        default=None,
        metadata={"help": "Where the JSON results go. None: <model>/evaluation.json for a local model folder."},
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.files:
            problems.append("--files is required (held-out text files)")
        if self.sample_by not in ("line", "paragraph", "document"):
            problems.append(f"--sample_by must be 'line', 'paragraph' or 'document', got {self.sample_by!r}")
        if self.context is not None and self.context < 1:
            problems.append(f"--context must be positive, got {self.context}")
        if self.stride is not None and self.stride < 1:
            problems.append(f"--stride must be positive, got {self.stride}")
        if self.stride is not None and self.context is not None and self.stride > self.context:
            problems.append(f"--stride {self.stride} is larger than --context {self.context}")
        if self.batch_size < 1:
            problems.append(f"--batch_size must be positive, got {self.batch_size}")
        if problems:
            raise LMKitError("; ".join(problems))


@dataclass
class GenerationArguments:
    """Prompts and sampling options for generate.py."""

    prompt: str | None = field(default=None, metadata={"help": "One prompt; its continuation streams to stdout."})
    prompts_file: str | None = field(
        default=None,
        metadata={
            "help": "A text file with one prompt per line (blank lines skipped), generated in left-padded batches."
        },
    )
    chat: bool = field(
        default=False,
        metadata={
            "help": "Render each prompt as a user turn with the model's chat template (the answer starts after it), "
            "as a model fine-tuned on chats expects."
        },
    )
    max_new_tokens: int = field(default=100, metadata={"help": "Tokens to generate per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_k: int = field(default=50, metadata={"help": "Sample among the k most likely tokens; 0 disables."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: smallest set with this probability mass."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty > 1 on tokens already present (CTRL)."})
    seed: int = field(default=0, metadata={"help": "Random seed, so a sampled output can be reproduced."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per batch with --prompts_file."})
    output_file: str | None = field(
        default=None, metadata={"help": "With --prompts_file: write prompts and completions as JSON lines here."}
    )

    def __post_init__(self) -> None:
        problems = []
        if (self.prompt is None) == (self.prompts_file is None):
            problems.append("pass exactly one of --prompt or --prompts_file")
        if self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"--top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.batch_size < 1:
            problems.append(f"--batch_size must be positive, got {self.batch_size}")
        if problems:
            raise LMKitError("; ".join(problems))


@dataclass
class PublishArguments:
    """Where the Hub-ready folder goes, and where and how it is uploaded."""

    repo_id: str = field(default=None, metadata={"help": "Hub repository, 'namespace/name' (or 'name' for yours)."})
    export_dir: str | None = field(
        default=None,
        metadata={"help": "Folder the Hub-ready files are written to. None: exports/<name> (exports/<name>-llama)."},
    )
    format: str = field(
        default="lmkit",
        metadata={
            "help": "'lmkit': lmkit's model with its code beside the weights (trust_remote_code); "
            "'llama': transformers' native LlamaForCausalLM, no remote code."
        },
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Write the folder and list what would be uploaded; no token, no network."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to upload to (created from main if missing). None: main."}
    )
    commit_message: str | None = field(
        default=None, metadata={"help": "Commit message. None: 'Upload <name> trained with lmkit'."}
    )
    license: str = field(default="apache-2.0", metadata={"help": "License id for the model card metadata."})
    datasets: list[str] | None = field(
        default=None, metadata={"help": "Datasets the model was trained on (hub ids or names), for the model card."}
    )
    language: list[str] | None = field(default=None, metadata={"help": "Language codes for the model card."})

    def __post_init__(self) -> None:
        problems = []
        if not self.repo_id:
            problems.append("--repo_id is required (e.g. your-name/model-name)")
        if self.format not in ("lmkit", "llama"):
            problems.append(f"--format must be 'lmkit' or 'llama', got {self.format!r}")
        if problems:
            raise LMKitError("; ".join(problems))
