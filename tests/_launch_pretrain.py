"""recipes/pretrain.py as launched by tests/test_distributed.py: the real recipe, instrumented.

With ``LMKIT_TEST_RECORD=<dir>``, each rank writes ``<dir>/rank<N>.json``: a fingerprint of every training row it
was fed, how many tokenization batches it ran itself, a digest of its weights (DDP), and (rank 0) the logits the
still-sharded model gives for a fixed input after training.
"""

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import torch

PROBE_INPUT = [[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]]


def param_digest(model: torch.nn.Module) -> str:
    """Fingerprint of a module's full parameters (as fp32 bytes), comparable across processes."""
    return hashlib.sha1(b"".join(p.detach().float().numpy().tobytes() for p in model.parameters())).hexdigest()


def instrument(record_dir: Path) -> None:
    import lmkit.data
    import lmkit.trainer

    rank = int(os.environ.get("RANK", 0))
    seen: list[str] = []
    counts = {"tokenize_batches": 0}
    out = record_dir / f"rank{rank}.json"

    tokenize = lmkit.data._tokenize_batch

    def counting_tokenize(*args, **kwargs):
        counts["tokenize_batches"] += 1
        return tokenize(*args, **kwargs)

    lmkit.data._tokenize_batch = counting_tokenize

    trainer_cls = lmkit.trainer.LMTrainer
    training_step, train = trainer_cls.training_step, trainer_cls.train

    def recording_step(self, model, inputs, num_items_in_batch=None):
        for row in inputs["input_ids"].tolist():
            seen.append(hashlib.sha1(json.dumps(row).encode()).hexdigest()[:16])
        return training_step(self, model, inputs, num_items_in_batch)

    def probing_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        # Every rank joins the forward: ZeRO-3 and FSDP gather each layer's shards collectively.
        model = self.model_wrapped
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(PROBE_INPUT)).logits.float()
        model.train()
        record = {"samples": seen, **counts, "world_size": self.args.world_size}
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # a full replica on every rank
            record["param_digest"] = param_digest(self.model)
        if self.is_world_process_zero():
            record["logits"] = logits[0].tolist()
        out.write_text(json.dumps(record))
        return result

    trainer_cls.training_step = recording_step
    trainer_cls.train = probing_train


if __name__ == "__main__":
    if os.environ.get("LMKIT_TEST_RECORD"):
        instrument(Path(os.environ["LMKIT_TEST_RECORD"]))
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "pretrain.py"
    sys.argv[0] = str(recipe)
    runpy.run_path(str(recipe), run_name="__main__")
