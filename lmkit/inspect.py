"""See rows as the model sees them: a collated batch and its tokenizer -> compact text, a per-position table, JSON.

Pure functions over what a collator returned (`lmkit.collator.CausalLMCollator` for pretraining and SFT rows,
`lmkit.dpo.PreferenceCollator` for preference pairs); ``recipes/inspect_data.py`` builds the batch as a recipe does.

The compact text shows each row as the token sequence it was cut from (inputs, then the last target): a token is
trained when the model is scored on predicting it. Spans that are not trained sit in ``⟦ ⟧`` (the first token of a
row never is: nothing predicts it), ``¦`` marks where a document starts (after an EOS, or where packed rows'
position ids restart at 0), ``⟨pad×N⟩`` stands for N padded positions, and whitespace is escaped (`escape`).
The table (``--format table``) lists every input position: position id, input token, target token, trained or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmkit.collator import IGNORE_INDEX
from lmkit.errors import LMKitError

LEGEND = "legend: ⟦…⟧ not trained   ¦ document start   ⟨pad×N⟩ padding   ␣ space   \\n newline   \\t tab"
FORMATS = ("text", "table", "json")
RECIPES = ("pretrain", "finetune", "dpo")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "␣"}


@dataclass
class InspectArguments:
    """What to show, and in which form."""

    recipe: str | None = field(
        default=None, metadata={"help": "pretrain, finetune or dpo. None: told from the flags and --config."}
    )
    rows: int = field(default=3, metadata={"help": "How many rows (preference pairs for dpo) to show."})
    split: str = field(default="train", metadata={"help": "train or validation."})
    format: str = field(default="text", metadata={"help": "text (compact), table (per position) or json."})

    def __post_init__(self) -> None:
        problems = []
        if self.recipe is not None and self.recipe not in RECIPES:
            problems.append(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.rows < 1:
            problems.append(f"--rows must be >= 1, got {self.rows}")
        if self.split not in ("train", "validation"):
            problems.append(f"--split must be 'train' or 'validation', got {self.split!r}")
        if self.format not in FORMATS:
            problems.append(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if problems:
            raise LMKitError("; ".join(problems))


def escape(text: str) -> str:
    """``text`` with whitespace made visible: space ``␣``, ``\\n``, ``\\t``, ``\\r``; other unprintable characters
    as Python escapes (``\\x00``); a backslash doubled so the escapes stay unambiguous."""
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() else c.encode("unicode_escape").decode()) for c in text)


@dataclass
class RowView:
    """One sequence as the model sees it, position by position (padding included, at the end)."""

    input_ids: list[int]
    targets: list[int]  # the token each position predicts; IGNORE_INDEX where nothing is learned
    position_ids: list[int]
    padding: list[bool]
    doc_starts: list[bool]  # a new document begins at this position (never at 0)
    tokens: list[str]  # each input token, decoded
    target_tokens: list[str | None]  # each target, decoded; None where it is not trained

    @property
    def trained(self) -> list[bool]:
        return [t != IGNORE_INDEX for t in self.targets]

    @property
    def n_tokens(self) -> int:
        return self.padding.count(False)

    @property
    def n_trained(self) -> int:
        return sum(self.trained)

    @property
    def n_documents(self) -> int:
        return (1 + sum(self.doc_starts)) if self.n_tokens else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "targets": self.targets,
            "trained": self.trained,
            "position_ids": self.position_ids,
            "padding": self.padding,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "n_tokens": self.n_tokens,
            "n_trained": self.n_trained,
            "n_documents": self.n_documents,
        }


def view_sequence(
    input_ids: list[int],
    targets: list[int],
    tokenizer: Any,
    position_ids: list[int] | None = None,
    attention_mask: list[int] | None = None,
    eos_separates: bool = True,
) -> RowView:
    """A `RowView` of one collated sequence.

    Padding: positions with ``attention_mask`` 0; in a packed row (``position_ids`` given, no mask), the last run
    of positions from a restart at 0 that holds only pad tokens and no targets (`lmkit.packing.pack_examples`).
    A document starts where ``position_ids`` restart at 0, or, without them and with ``eos_separates`` (packed
    pretraining blocks; not SFT rows, whose chat template may end turns with EOS), right after an EOS.
    Without ``position_ids`` the model numbers positions 0, 1, ..., and so does the view.
    """
    n = len(input_ids)
    if attention_mask is not None:
        padding = [m == 0 for m in attention_mask]
    else:
        padding = [False] * n
        if position_ids is not None:
            last = max((i for i, p in enumerate(position_ids) if p == 0), default=0)
            tail = range(last, n)
            if last > 0 and all(input_ids[i] == tokenizer.pad_token_id and targets[i] == IGNORE_INDEX for i in tail):
                padding[last:] = [True] * (n - last)
    if position_ids is None:
        doc_starts = [eos_separates and i > 0 and input_ids[i - 1] == tokenizer.eos_token_id for i in range(n)]
        position_ids = list(range(n))
    else:
        doc_starts = [i > 0 and p == 0 for i, p in enumerate(position_ids)]
    doc_starts = [start and not pad for start, pad in zip(doc_starts, padding, strict=True)]

    def decode(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    return RowView(
        input_ids=list(input_ids),
        targets=list(targets),
        position_ids=list(position_ids),
        padding=padding,
        doc_starts=doc_starts,
        tokens=[decode(t) for t in input_ids],
        target_tokens=[None if t == IGNORE_INDEX else decode(t) for t in targets],
    )


def row_views(batch: dict[str, Any], tokenizer: Any, eos_separates: bool = True) -> list[RowView]:
    """One `RowView` per row of a `CausalLMCollator` batch (``input_ids``, ``labels``, optional ``position_ids``
    and ``attention_mask``); ``eos_separates``: an EOS ends a document (pretraining blocks, see `view_sequence`)."""
    return [
        view_sequence(
            _list(batch["input_ids"])[i],
            _list(batch["labels"])[i],
            tokenizer,
            position_ids=_list(batch["position_ids"])[i] if "position_ids" in batch else None,
            attention_mask=_list(batch["attention_mask"])[i] if "attention_mask" in batch else None,
            eos_separates=eos_separates,
        )
        for i in range(len(batch["input_ids"]))
    ]


def pair_views(batch: dict[str, Any], tokenizer: Any) -> list[tuple[RowView, RowView]]:
    """(chosen, rejected) `RowView` per pair of a `lmkit.dpo.PreferenceCollator` batch, packed or not: sequences
    0 .. B-1 are the chosen answers, B .. 2B-1 the rejected ones (``sequence_ids`` says which position is which)."""
    input_ids, targets, seq_ids = _list(batch["input_ids"]), _list(batch["targets"]), _list(batch["sequence_ids"])
    positions = _list(batch["position_ids"]) if "position_ids" in batch else None
    mask = _list(batch["attention_mask"]) if "attention_mask" in batch else None
    n_seqs = max(max(row) for row in seq_ids) + 1
    views = []
    for s in range(n_seqs):
        if positions is not None:  # packed: every sequence is a run of the one row
            at = [i for i, owner in enumerate(seq_ids[0]) if owner == s]
            views.append(
                view_sequence(
                    [input_ids[0][i] for i in at],
                    [targets[0][i] for i in at],
                    tokenizer,
                    position_ids=[positions[0][i] for i in at],
                )
            )
        else:
            attention = mask[s] if mask else None
            views.append(
                view_sequence(input_ids[s], targets[s], tokenizer, attention_mask=attention, eos_separates=False)
            )
    half = n_seqs // 2
    return [(views[k], views[half + k]) for k in range(half)]


def _list(value: Any) -> list[Any]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary(view: RowView) -> str:
    """``12 tokens, 5 trained, 2 documents`` (``, 3 padding`` when padded)."""
    n_pad = len(view.padding) - view.n_tokens
    text = f"{_count(view.n_tokens, 'token')}, {view.n_trained} trained, {_count(view.n_documents, 'document')}"
    return text + (f", {n_pad} padding" if n_pad else "")


def _sequence(view: RowView) -> list[tuple[str, bool, bool]]:
    """(token text, trained, starts a document) for the tokens the row was cut from: the inputs, then the last
    target when it is trained (an untrained last target is neither seen nor learned)."""
    n = view.n_tokens
    if n == 0:
        return []
    seq = [(view.tokens[0], False, False)]
    seq += [(view.tokens[j], view.trained[j - 1], view.doc_starts[j]) for j in range(1, n)]
    if view.trained[n - 1]:
        seq.append((view.target_tokens[n - 1], True, False))
    return seq


def _compact(seq: list[tuple[str, bool, bool]], n_pad: int = 0) -> str:
    out: list[str] = []
    masked = False
    for text, trained, doc_start in seq:
        if doc_start:
            if masked:
                out.append("⟧")
                masked = False
            out.append("¦")
        if masked == trained:
            out.append("⟧" if masked else "⟦")
            masked = not masked
        out.append(escape(text))
    if masked:
        out.append("⟧")
    if n_pad:
        out.append(f"⟨pad×{n_pad}⟩")
    return "".join(out)


def compact(view: RowView) -> str:
    """The row on one line, untrained spans in ``⟦ ⟧``, document starts ``¦``, padding ``⟨pad×N⟩``."""
    return _compact(_sequence(view), len(view.padding) - view.n_tokens)


def table(view: RowView) -> str:
    """One line per input position: index, position id, input id and token, target id and token, trained."""
    width = max([5] + [len(escape(t)) for t in view.tokens] + [len(escape(t or "")) for t in view.target_tokens])
    lines = [f"{'i':>5} {'pos':>5} {'in_id':>7}  {'input':<{width}} {'tgt_id':>7}  {'target':<{width}} trained"]
    for i, (inp, tgt) in enumerate(zip(view.input_ids, view.targets, strict=True)):
        trained = view.targets[i] != IGNORE_INDEX
        note = "pad" if view.padding[i] else ("yes" if trained else "-")
        note += "   ¦ document start" if view.doc_starts[i] else ""
        target = escape(view.target_tokens[i] or "")
        lines.append(
            f"{i:>5} {view.position_ids[i]:>5} {inp:>7}  {escape(view.tokens[i]):<{width}} {tgt:>7}  "
            f"{target:<{width}} {note}"
        )
    return "\n".join(line.rstrip() for line in lines)


def render_rows(views: list[RowView], fmt: str = "text") -> str:
    """``text``: the legend, then per row a summary line and its compact line; ``table``: a summary line and the
    table per row; ``json``: one JSON object per row (`RowView.to_json` plus ``"row"``), one per line."""
    if fmt == "json":
        return "\n".join(json.dumps({"row": i, **v.to_json()}, ensure_ascii=False) for i, v in enumerate(views))
    blocks = [LEGEND] if fmt == "text" else []
    for i, view in enumerate(views):
        body = compact(view) if fmt == "text" else table(view)
        blocks.append(f"row {i}: {summary(view)}\n{body}")
    return "\n\n".join(blocks)


def _split_prompt(view: RowView) -> tuple[list[tuple[str, bool, bool]], list[tuple[str, bool, bool]]]:
    seq = _sequence(view)
    first = next((j for j, (_, trained, _) in enumerate(seq) if trained), len(seq))
    return seq[:first], seq[first:]


def render_pairs(pairs: list[tuple[RowView, RowView]], fmt: str = "text") -> str:
    """``text``: per pair a summary line, then the prompt (the untrained start of the chosen sequence), the chosen
    and the rejected answer on a line each; ``table``: both sequences' tables; ``json``: one object per pair,
    ``{"pair": k, "chosen": {...}, "rejected": {...}}`` (`RowView.to_json`)."""
    if fmt == "json":
        return "\n".join(
            json.dumps({"pair": k, "chosen": c.to_json(), "rejected": r.to_json()}, ensure_ascii=False)
            for k, (c, r) in enumerate(pairs)
        )
    blocks = [LEGEND] if fmt == "text" else []
    for k, (chosen, rejected) in enumerate(pairs):
        head = f"pair {k}: chosen {summary(chosen)}; rejected {summary(rejected)}"
        if fmt == "table":
            blocks.append(f"{head}\nchosen:\n{table(chosen)}\nrejected:\n{table(rejected)}")
            continue
        (prompt, chosen_answer), (rejected_prompt, rejected_answer) = _split_prompt(chosen), _split_prompt(rejected)
        lines = [head, f"  prompt:   {''.join(escape(t) for t, _, _ in prompt)}"]
        if rejected_prompt != prompt:
            lines.append(f"  rejected prompt: {''.join(escape(t) for t, _, _ in rejected_prompt)}")
        lines.append(f"  chosen:   {_compact(chosen_answer, len(chosen.padding) - chosen.n_tokens)}")
        lines.append(f"  rejected: {_compact(rejected_answer, len(rejected.padding) - rejected.n_tokens)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
