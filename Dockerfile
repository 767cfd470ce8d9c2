# lmkit on a CUDA PyTorch base, DeepSpeed's CUDA/CPU Adam ops compiled at build time, `accelerate launch` as entrypoint.
#   docker build -t lmkit .
#   docker run --gpus all --ipc=host -v "$PWD/outputs:/workspace/lmkit/outputs" lmkit \
#       --config_file accelerate_configs/deepspeed_zero3.yaml recipes/pretrain.py --config recipes/configs/gpt2-small.yaml
# The devel flavour carries nvcc, which DeepSpeed needs to compile its ops; the runtime flavour cannot build them.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

# GPU generations the prebuilt ops target (no GPU is visible during `docker build`): A100, A10/3090, L4/4090, H100.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG DEEPSPEED_VERSION=0.19.8

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

# ninja drives DeepSpeed's op builds; libaio backs its NVMe offload (async_io).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ninja-build libaio-dev \
    && rm -rf /var/lib/apt/lists/*

# DeepSpeed first, in its own layer: compiling the ops takes minutes and changes far less often than lmkit.
# Prebuilt: fused Adam (GPU optimizer), CPU Adam (ZeRO-Offload), async_io (NVMe offload). Anything else is
# JIT-compiled on first use, into ~/.cache/torch_extensions.
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_AIO=1 \
    pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
    && python -c "from deepspeed.git_version_info import installed_ops as ops; \
missing = [op for op in ('fused_adam', 'cpu_adam', 'async_io') if not ops.get(op)]; \
assert not missing, f'DeepSpeed ops not prebuilt: {missing}'"

WORKDIR /workspace/lmkit
# Dependencies before sources, so editing lmkit does not reinstall transformers and friends.
COPY pyproject.toml README.md ./
RUN mkdir lmkit && touch lmkit/__init__.py \
    && pip install -e . \
    && rm -rf lmkit
# A regular (non-editable) install: the bundled corpus and chat templates ship inside the package, and each recipe
# finds its presets beside it in recipes/configs. -I keeps the source tree in the working directory out of the check.
COPY . .
RUN pip install --no-deps . \
    && python -I -c "import lmkit.distributed, lmkit.args as a, lmkit.sft as s; \
assert a.BUNDLED_CORPUS.is_file() and s.DEFAULT_CHAT_TEMPLATE.is_file(), 'package data missing'"

ENTRYPOINT ["accelerate", "launch"]
CMD ["--config_file", "accelerate_configs/single_gpu.yaml", "recipes/pretrain.py"]
