"""Publish a trained model: write a Hub-ready folder, then upload it with huggingface_hub.

    python recipes/publish.py --model outputs/pretrain --repo_id me/shakespeare-tiny --dry_run
    python recipes/publish.py --model outputs/pretrain --repo_id me/shakespeare-tiny --private --revision v1
    python recipes/publish.py --model outputs/pretrain --repo_id me/shakespeare-tiny-llama --format llama

The folder (--export_dir, default exports/<name>, or exports/<name>-llama with --format llama) holds safetensors
weights, config.json, the tokenizer, generation_config.json, a README.md model card (metadata with a model-index of
the eval metrics from <model>/evaluation.json or eval_results.json) and loss_curve.png from trainer_state.json.
--format lmkit (default) ships lmkit's two model files with an auto_map, loadable with trust_remote_code=True;
--format llama converts to transformers' LlamaForCausalLM (same weights, same logits, no remote code).
--dry_run stops after writing the folder and lists what would be uploaded. A real upload reads the token from
HF_TOKEN or the saved login (`hf auth login`); the token is never printed or written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmkit.args import parse_args
from lmkit.errors import main_entry
from lmkit.eval_args import CheckpointArguments, PublishArguments
from lmkit.hub import (
    check_model_dir,
    check_repo_id,
    default_export_dir,
    export_model,
    resolve_token,
    upload,
)
from lmkit.runtime import setup_tool_logging

logger = logging.getLogger("lmkit.publish")


@main_entry
def main(argv: list[str] | None = None) -> Path:
    # -- setup: everything checkable before the export is checked first ----------------------------------------
    ckpt: CheckpointArguments
    pub: PublishArguments
    ckpt, pub = parse_args((CheckpointArguments, PublishArguments), argv=argv)
    setup_tool_logging(logging.INFO)
    check_repo_id(pub.repo_id)
    check_model_dir(ckpt.model)
    token = None if pub.dry_run else resolve_token()
    export_dir = Path(pub.export_dir) if pub.export_dir else default_export_dir(pub.repo_id, pub.format)

    # -- export -----------------------------------------------------------------------------------------------
    files = export_model(
        ckpt.model, export_dir, pub.repo_id, pub.format, license=pub.license, datasets=pub.datasets,
        language=pub.language,
    )  # fmt: skip
    target = f"{pub.repo_id}@{pub.revision or 'main'}{' (private)' if pub.private else ''}"
    listing = "\n".join(f"  {f.name:<28} {f.stat().st_size:>12,} bytes" for f in files)

    # -- upload -----------------------------------------------------------------------------------------------
    if pub.dry_run:
        print(f"dry run: would upload {len(files)} files from {export_dir} to {target}:\n{listing}")
        return export_dir
    print(f"uploading {len(files)} files from {export_dir} to {target}:\n{listing}")
    url = upload(export_dir, pub.repo_id, token, pub.private, pub.revision, pub.commit_message)
    print(f"uploaded: {url}")
    return export_dir


if __name__ == "__main__":
    main()
