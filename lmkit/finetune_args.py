"""Arguments of ``recipes/finetune.py`` beyond the shared groups: SFT data formatting and LoRA.

The starting checkpoint is ``--model_name_or_path`` (ModelArguments); files, ``--block_size`` (the longest example)
and ``--validation_split`` come from DataArguments; everything of the Trainer from LMTrainingArguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkit.errors import LMKitError


@dataclass
class FinetuneArguments:
    """How examples are formatted and masked, and whether to train LoRA adapters instead of all weights."""

    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template file for {'messages': [...]} data. None: the tokenizer's own template, "
            "else lmkit's default ChatML file (lmkit/templates/chatml.jinja), whose markers are added as tokens."
        },
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Also learn the prompt / user / system tokens (default: answers only)."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several SFT examples into one row of --block_size + 1 tokens; attention and positions "
            "stay within each example (position_ids restart per example)."
        },
    )
    pad_to_multiple_of: int = field(
        default=16,
        metadata={
            "help": "Pad each unpacked batch to a width that is a multiple of this (1: the longest row). Fewer "
            "distinct shapes: on a CPU, bf16 fine-tuning ran 1.5x faster and its memory stopped growing "
            "(lmkit.collator.padded_width)."
        },
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is alpha / r * BA)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names to adapt (e.g. q_proj v_proj), or 'all-linear': every linear layer but the LM head."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "After LoRA training, also write base + adapter merged into a full model in OUTPUT_DIR/merged."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the base model in 4-bit NF4 (needs a CUDA GPU and bitsandbytes; implies LoRA)."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.pad_to_multiple_of < 1:
            problems.append(f"--pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of}")
        if self.lora_r <= 0:
            problems.append(f"--lora_r must be positive, got {self.lora_r}")
        if self.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            problems.append("--lora_target_modules is empty")
        if self.load_in_4bit:
            self.use_lora = True
        if self.merge_lora and not self.use_lora:
            problems.append("--merge_lora needs --use_lora")
        if problems:
            raise LMKitError("; ".join(problems))
