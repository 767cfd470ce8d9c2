"""Arguments of ``recipes/dpo.py`` beyond the shared groups: the preference loss and its reference model.

Chat templates, ``--packing`` and the LoRA flags come from FinetuneArguments, files from DataArguments, the Trainer's
from LMTrainingArguments. ``--max_length`` (here) bounds prompt + answer; DataArguments' ``--block_size`` is unused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lmkit.args import explicit_fields, fit_length
from lmkit.errors import LMKitError

logger = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PreferenceArguments:
    """Which preference loss to optimise, its strength, how long a pair may be, and what the reference is."""

    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid (DPO), ipo (squared, per-token log-ratios), simpo (reference-free, length-normalised, "
            "margin --simpo_gamma), orpo (reference-free: NLL on the chosen answer + odds-ratio term)."
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "DPO/SimPO: scale of the log-ratio inside the sigmoid; IPO: the regulariser tau (target margin "
            "1 / (2 beta)); ORPO: weight of the odds-ratio term (lambda)."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "sigmoid / simpo: assumed probability that a pair's label is flipped (cDPO), in [0, 0.5)."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma."})
    max_length: int = field(
        default=1024,
        metadata={
            "help": "Longest prompt + answer in tokens. Longer answers are cut at the end (counted in the log); a "
            "pair whose prompt leaves no room for an answer is dropped (counted)."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A separate reference model (its tokenizer must equal the policy's). None: the starting model "
            "itself (with --use_lora: the base, before the adapter exists). Its log-probs are computed once "
            "before training and cached on disk; it is never held in memory while training."
        },
    )

    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Add this weight x the mean NLL of the chosen answers' tokens (TRL's loss_type [..., 'sft'], "
            "RPO). DPO alone lowers chosen and rejected likelihoods together and the mass drains to tokens the "
            "data never shows; this anchors the chosen answers. Not with orpo, which has its own NLL term (a "
            "preset's weight becomes 0 there; one you set is an error)."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"--loss_type {self.loss_type!r} is unknown (choose one of {', '.join(LOSS_TYPES)})")
        if self.beta <= 0:
            problems.append(f"--beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            problems.append(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            problems.append(f"--label_smoothing applies to sigmoid and simpo, not --loss_type {self.loss_type}")
        if self.sft_weight < 0:
            problems.append(f"--sft_weight must be >= 0, got {self.sft_weight}")
        if self.max_length < 2:
            problems.append(f"--max_length must be at least 2, got {self.max_length}")
        if self.ref_model_name_or_path and self.loss_type in REFERENCE_FREE:
            problems.append(
                f"--ref_model_name_or_path: --loss_type {self.loss_type} is reference-free and would ignore it"
            )
        if problems:
            raise LMKitError("; ".join(problems))

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE


def fit_sft_weight(pref_args: PreferenceArguments) -> None:
    """``--loss_type orpo`` adds the chosen answers' NLL itself (weight 1), so ``--sft_weight`` would count it twice.

    A preset's or default weight becomes 0, with one log line; one the user set (`lmkit.args.explicit_fields`)
    raises `LMKitError` naming the flag. The other losses take any weight (simpo: CPO's NLL term).
    """
    if pref_args.loss_type != "orpo" or not pref_args.sft_weight:
        return
    if "sft_weight" in explicit_fields(pref_args):
        raise LMKitError(
            f"--sft_weight {pref_args.sft_weight:g}: --loss_type orpo already adds the chosen answers' NLL (weight 1)"
        )
    logger.info(
        "--sft_weight %g (a default) does not apply to --loss_type orpo, which adds the chosen answers' NLL "
        "itself: using --sft_weight 0",
        pref_args.sft_weight,
    )
    pref_args.sft_weight = 0.0


def fit_preference_args(pref_args: PreferenceArguments, max_positions: int | None, limit: str) -> None:
    """The checks that follow the model and the loss, run before the start-up report (which then shows the fitted
    values): ``--max_length`` fits the model's ``max_positions`` (`lmkit.args.fit_length`; ``limit`` names that
    number), and ``--sft_weight`` gives way to orpo's own NLL (`fit_sft_weight`)."""
    fit_length(pref_args, "max_length", max_positions, limit)
    fit_sft_weight(pref_args)
