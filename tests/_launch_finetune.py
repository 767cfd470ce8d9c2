"""recipes/finetune.py as launched by tests/test_finetune.py's multi-process test: the real recipe, instrumented.

With ``LMKIT_TEST_RECORD=<dir>``, each rank writes ``<dir>/rank<N>.json`` after every training step: the rows it
trained on so far, each as ``[input_ids, shift_labels]``.
"""

import json
import os
import runpy
import sys
from pathlib import Path


def instrument(record_dir: Path) -> None:
    import lmkit.trainer

    out = record_dir / f"rank{os.environ.get('RANK', '0')}.json"
    seen: list[list[list[int]]] = []
    trainer_cls = lmkit.trainer.LMTrainer
    training_step = trainer_cls.training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        rows = zip(inputs["input_ids"].tolist(), inputs["shift_labels"].tolist(), strict=True)
        seen.extend([ids, targets] for ids, targets in rows)
        out.write_text(json.dumps(seen))
        return training_step(self, model, inputs, num_items_in_batch)

    trainer_cls.training_step = recording_step


if __name__ == "__main__":
    if os.environ.get("LMKIT_TEST_RECORD"):
        instrument(Path(os.environ["LMKIT_TEST_RECORD"]))
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "finetune.py"
    sys.argv[0] = str(recipe)
    runpy.run_path(str(recipe), run_name="__main__")
