#!/usr/bin/env bash
# One-GPU check of lmkit, in under 8 minutes, ending in one table.
#
#     bash benchmarks/gpu_check.sh                  # from the repository root, in lmkit's environment
#     PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Rows:
#   - the tests marked `cuda` (`pytest -m cuda`; "none" when no test carries the marker), each one listed;
#   - SDPA's flash kernel in bf16 on lmkit's model (loss and gradients against the math kernel), bf16 "auto"
#     resolving to on, and the fused (chunked) LM-head loss against the unchunked one (loss and gradients);
#   - training tokens/s, MFU (against the GPU's data-sheet bf16 peak, lmkit.perf.GPU_PEAK_FLOPS) and peak memory of
#     the llama-1b preset (recipes/configs/llama-1b.yaml: 16 x 2048, GQA 32/8, FFN 8192, vocab 32k, seq 2048,
#     micro-batch 8, bf16, gradient checkpointing) with `LMTrainer`, eager and --torch_compile, against stock
#     `LlamaForCausalLM` of the same shape on the stock `Trainer`, and with Liger kernels where liger-kernel is
#     installed;
#   - an SFT row: benchmarks/bench_finetune.py on the GPU (lmkit vs TRL, full fine-tuning, unpacked and packed).
# Every stage has its own time limit and a stage that would overrun the 470 s budget is skipped (and says so).
# Without a CUDA device it prints "no CUDA device: skipped" and exits 0.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python}
BUDGET_S=470

# No NVIDIA device node: skip at once (importing torch takes seconds); otherwise ask torch.
if ! compgen -G '/dev/nvidia[0-9]*' >/dev/null ||
    ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA device: skipped"
    exit 0
fi

WORK=$(mktemp -d -t lmkit-gpu-check-XXXXXX)
ROWS="$WORK/rows.tsv"  # stage <TAB> result <TAB> detail
: >"$ROWS"
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$ROWS"; }

# run_stage NAME LIMIT_S COMMAND...: run with a time limit unless it would overrun the budget; output in $WORK/NAME.log
run_stage() {
    local name=$1 limit=$2
    shift 2
    if ((SECONDS + limit > BUDGET_S)); then
        row "$name" "SKIPPED" "would overrun the ${BUDGET_S} s budget (${SECONDS} s used)"
        return 124
    fi
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    ((rc == 124)) && row "$name" "TIMEOUT" "over ${limit} s; log: $WORK/$name.log"
    return $rc
}

# -- 1. tests marked cuda --------------------------------------------------------------------------------------
run_stage pytest-cuda 90 "$PYTHON" -m pytest -m cuda -q -rA -p no:cacheprovider tests
rc=$?
if ((rc == 5)); then
    row "pytest -m cuda" "none" "no test carries the cuda marker"
elif ((rc != 124)); then
    summary=$(grep -v "^[[:space:]]*$" "$WORK/pytest-cuda.log" | tail -n 1 | cut -c1-120)
    row "pytest -m cuda" "$( ((rc == 0)) && echo PASS || echo FAIL)" "$summary"
    grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$WORK/pytest-cuda.log" | while read -r status test rest; do
        row "  $test" "$status" "$rest"
    done
fi

# -- 2. kernels and numerics, 3. llama-1b throughput: one Python helper ---------------------------------------
cat >"$WORK/gpu_check.py" <<'PY'
"""Helper of gpu_check.sh: `checks` prints check rows; `train KIND COMPILE STEPS` prints one throughput row."""

import importlib.util
import sys
import tempfile
import time

import torch

from lmkit import LMConfig, LMForCausalLM
from lmkit.args import parse_args
from lmkit.perf import resolve_attn_implementation, resolve_peak_flops, training_flops_per_token

PRESET = "recipes/configs/llama-1b.yaml"


def emit(stage, result, detail):
    print(f"{stage}\t{result}\t{detail}", flush=True)


def small_model(**kw):
    torch.manual_seed(0)
    config = LMConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **kw)
    return config


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None]


def max_rel(a, b):
    return max(float((x - y).norm() / (y.norm() + 1e-12)) for x, y in zip(a, b, strict=True))


def checks():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ids = torch.randint(0, 4095, (2, 2048), device="cuda")
    config = small_model()
    config._attn_implementation = "sdpa"
    model = LMForCausalLM(config).cuda().train()
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = loss_and_grads(model, ids)
        with sdpa_kernel([SDPBackend.MATH]):
            math_ = loss_and_grads(model, ids)
        dl, dg = abs(float(flash[0] - math_[0])), max_rel(flash[1], math_[1])
        ok = dl < 2e-2 and dg < 5e-2
        emit("SDPA flash attention, bf16", "PASS" if ok else "FAIL",
             f"loss {float(flash[0]):.4f} vs math {float(math_[0]):.4f}; grads rel. diff {dg:.1e}")
    except RuntimeError as err:  # no flash kernel for this GPU / dtype
        emit("SDPA flash attention, bf16", "FAIL", str(err).splitlines()[0][:100])

    from lmkit.args import LMTrainingArguments

    args = LMTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none")
    emit("bf16 auto", "PASS" if args.bf16 is True else "FAIL",
         f"--bf16 auto -> {args.bf16} (torch.cuda.is_bf16_supported() = {torch.cuda.is_bf16_supported()})")

    results = {}
    for chunk in (0, 512):
        config = small_model(loss_chunk_size=chunk)
        config._attn_implementation = "sdpa"
        results[chunk] = loss_and_grads(LMForCausalLM(config).cuda().train(), ids)
    dl, dg = abs(float(results[512][0] - results[0][0])), max_rel(results[512][1], results[0][1])
    emit("fused (chunked) loss", "PASS" if dl < 1e-2 and dg < 5e-2 else "FAIL",
         f"512-token chunks: loss {float(results[512][0]):.4f} vs {float(results[0][0]):.4f}; grads rel. diff {dg:.1e}")


def train(kind, compile_, steps):
    from datasets import Dataset
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from lmkit.collator import CausalLMCollator
    from lmkit.runtime import configure_allocator
    from lmkit.trainer import LMTrainer

    out = tempfile.mkdtemp(prefix="lmkit-gpu-check-")
    model_args, data_args, args = parse_args(argv=[
        "--config", PRESET, "--output_dir", out, "--max_steps", str(steps), "--logging_steps", str(steps),
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--warmup_steps", "0", "--gradient_accumulation_steps", "1", "--torch_compile", str(compile_).lower(),
        "--sample_prompt", "", "--dataloader_drop_last", "true", "--eval_on_start", "false",
    ])
    T, B = data_args.block_size, args.per_device_train_batch_size
    config = LMConfig(**model_args.config_kwargs(), vocab_size=model_args.vocab_size)
    config._attn_implementation = resolve_attn_implementation(model_args.attn_implementation, args, T)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size - 1, (B * steps, T + 1), generator=g)
    torch.manual_seed(0)
    if kind == "lmkit":
        configure_allocator(args)  # the recipes' set-up step (a CPU-only setting: nothing on a GPU)
        model = LMForCausalLM(config)
        data = Dataset.from_dict({"input_ids": tokens.tolist()})
        trainer_cls, collator = LMTrainer, CausalLMCollator(pad_token_id=config.vocab_size - 1)
    else:
        llama = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, max_position_embeddings=T, rms_norm_eps=config.rms_norm_eps,
            rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
        )
        model = LlamaForCausalLM(llama)
        rows = tokens[:, :T].tolist()
        data = Dataset.from_dict({"input_ids": rows, "labels": rows})
        trainer_cls, collator = Trainer, default_data_collator
        stock = TrainingArguments(
            output_dir=out, per_device_train_batch_size=B, max_steps=steps, logging_steps=steps, learning_rate=3e-4,
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, bf16=True,
            activation_checkpointing=args.activation_checkpointing, torch_compile=compile_, optim="adamw_torch_fused",
            use_liger_kernel=kind == "llama-liger", dataloader_drop_last=True,
        )
        args = stock

    class Clock(TrainerCallback):
        t0 = t1 = None

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            if state.global_step == 5:
                Clock.t0 = time.perf_counter()
            Clock.t1 = time.perf_counter()

    torch.cuda.reset_peak_memory_stats()
    trainer = trainer_cls(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    tok_s = (steps - 5) * B * T / (Clock.t1 - Clock.t0)
    peak, source = resolve_peak_flops(torch.device("cuda"), torch.bfloat16)
    mfu = tok_s * training_flops_per_token(config, T) / peak
    label = f"llama-1b {kind}" + (", compiled" if compile_ else "")
    emit(label, f"{tok_s:,.0f} tok/s, MFU {mfu:.1%}",
         f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; {B} x {T}, activation ckpt "
         f"{bool(args.activation_checkpointing)}; peak {peak / 1e12:.0f} TFLOP/s ({source})")


if __name__ == "__main__":
    if sys.argv[1] == "checks":
        checks()
    elif sys.argv[1] == "liger":
        sys.exit(0 if importlib.util.find_spec("liger_kernel") else 1)
    else:
        train(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]))
PY

# collect NAME LABEL RC: the rows a stage printed; a FAIL row with its last other line when it failed on its own
collect() {
    grep -P '^[^\t]+\t[^\t]+\t' "$WORK/$1.log" >>"$ROWS"
    if (($3 != 0 && $3 != 124)); then
        row "$2" "FAIL" "rc $3: $(grep -v -P '\t' "$WORK/$1.log" | tail -n 1 | cut -c1-120)"
    fi
}

run_stage checks 60 "$PYTHON" "$WORK/gpu_check.py" checks
collect checks "checks" $?

STEPS=20  # 5 warm-up steps, 15 timed: 15 x 8 x 2,048 = 245,760 tokens
runs=("lmkit 0" "lmkit 1" "llama 0")
"$PYTHON" "$WORK/gpu_check.py" liger && runs+=("llama-liger 0") || row "Llama + Liger" "SKIPPED" "liger-kernel not installed"
for run in "${runs[@]}"; do
    read -r kind compiled <<<"$run"
    label="llama-1b $kind$( ((compiled)) && echo ', compiled')"
    limit=$( ((compiled)) && echo 150 || echo 75)
    run_stage "train-$kind-$compiled" "$limit" "$PYTHON" "$WORK/gpu_check.py" train "$kind" "$compiled" "$STEPS"
    collect "train-$kind-$compiled" "$label" $?
done

# -- 4. SFT: lmkit vs TRL on the GPU ----------------------------------------------------------------------------
if run_stage sft 120 "$PYTHON" benchmarks/bench_finetune.py --device cuda --only full packed --repeats 1 \
    --hidden_size 1024 --num_layers 8 --num_heads 16 --num_kv_heads 4 --block_size 1024 --rows 256; then
    grep -E '^\| (full|packed) lmkit' "$WORK/sft.log" | while IFS='|' read -r _ name steps tok vs mem vsm loss eloss _; do
        row "SFT $(echo "$name" | xargs)" "$(echo "$vs" | xargs) TRL" "$(echo "$tok" | xargs) trained tok/s; peak $(echo "$mem" | xargs) MiB ($(echo "$vsm" | xargs) TRL); loss $(echo "$loss" | xargs)"
    done
elif (($? != 124)); then
    row "SFT (bench_finetune.py)" "FAIL" "$(tail -n 1 "$WORK/sft.log" | cut -c1-120)"
fi

# -- table ----------------------------------------------------------------------------------------------------
gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)
echo
echo "gpu_check: $gpu; ${SECONDS} s; logs in $WORK"
"$PYTHON" - "$ROWS" <<'PY'
import sys

rows = [line.rstrip("\n").split("\t", 2) for line in open(sys.argv[1]) if line.strip()]
w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("check", "result", "detail"))]
print(f"| {'check':{w[0]}} | {'result':{w[1]}} | {'detail':{w[2]}} |")
print("|" + "|".join("-" * (n + 2) for n in w) + "|")
for r in rows:
    print(f"| {r[0]:{w[0]}} | {r[1]:{w[1]}} | {r[2]:{w[2]}} |")
PY
