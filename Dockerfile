# syntax=docker/dockerfile:1
# revdeq in a container; the entrypoint is the `revdeq` command.
#
#   docker build -t revdeq .                               # CPU image (default): python:3.11-slim + CPU torch
#   docker build -t revdeq:cuda --build-arg BASE=cuda .    # CUDA image: NVIDIA CUDA runtime + CUDA torch
#
#   docker run --rm revdeq --help
#   docker run --rm -v "$PWD/runs:/work/runs" revdeq train --preset tiny --max-steps 200
#   docker run --rm -v "$PWD/runs:/work/runs" revdeq generate "def main(" -c runs
#   docker run --rm --gpus all -v "$PWD/runs:/work/runs" revdeq:cuda train --device cuda
#
# Build arguments:
#   BASE             cpu (default) or cuda
#   TORCH_INDEX_URL  PyTorch wheel index; defaults to .../whl/cpu for BASE=cpu and .../whl/cu128 for BASE=cuda
#                    (choose the cuXXX index your driver supports, see https://pytorch.org/get-started/locally/)
#   CUDA_IMAGE       the CUDA base image for BASE=cuda
#
# The two `pip install` steps are the README's Quickstart (torch first, then the package); the only
# difference is the wheel index, so the CPU image does not download CUDA libraries.
# tests/test_dockerfile.py keeps the two in step.
# Runs, caches and downloaded datasets live under /work and /cache: mount volumes there to keep them.

ARG BASE=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM python:3.11-slim AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}

FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu's Python is "externally managed": install into a virtual environment that is first on PATH.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

FROM base-${BASE}
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REVDEQ_CACHE_DIR=/cache/revdeq \
    HF_HOME=/cache/huggingface
WORKDIR /opt/revdeq
# Quickstart step 1: torch, from the wheel index that matches the base image.
RUN pip install torch --index-url ${TORCH_INDEX_URL}
COPY . .
# Quickstart step 2: the package, exactly as the README installs it.
RUN pip install -e ".[dev]"
WORKDIR /work
ENTRYPOINT ["revdeq"]
CMD ["--help"]
