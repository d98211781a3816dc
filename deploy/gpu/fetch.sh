#!/usr/bin/env bash
# Run where PyPI is reachable. Downloads onnxruntime-gpu (the CUDA 13 build, ~255 MB) and the small wheels the
# benchmark needs for the GPU machine's Python, and cuts the big wheel into folders under .gpu-carry/ of at most
# 55 MiB each, so every folder (and .gpu-carry/wheels/) fits one transfer of 64 MiB.
#   ORT_VERSION (1.31.1), PYTHON_VERSION (3.12), PIP (.venv/bin/pip) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."

ORT_VERSION="${ORT_VERSION:-1.31.1}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PIP="${PIP:-.venv/bin/pip}"
CARRY=.gpu-carry
TARGET=(--only-binary=:all: --python-version "$PYTHON_VERSION" --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

rm -rf "$CARRY" && mkdir -p "$CARRY/download" "$CARRY/wheels"
"$PIP" download --no-deps "${TARGET[@]}" -d "$CARRY/download" "onnxruntime-gpu==$ORT_VERSION"
# onnxruntime's own dependencies and the CLI's (numpy only in case the GPU machine lacks it; PyTorch and its
# CUDA libraries are expected there)
"$PIP" download "${TARGET[@]}" -d "$CARRY/wheels" flatbuffers "protobuf>=4.25.8" packaging \
    "typer>=0.12" "rich>=13" "pydantic>=2.7,<3" "pydantic-settings>=2.3" "numpy>=1.26,<3"

wheel=$(basename "$CARRY"/download/onnxruntime_gpu-*.whl)
(cd "$CARRY/download" && sha256sum "$wheel") > "$CARRY/wheels/SHA256SUMS"
echo "$wheel" > "$CARRY/wheels/ORT_WHEEL"
split -b 55M -d -a 2 "$CARRY/download/$wheel" "$CARRY/download/$wheel.part-"
for part in "$CARRY"/download/"$wheel".part-*; do
    folder="$CARRY/ort-${part##*.part-}"
    mkdir -p "$folder" && mv "$part" "$folder/"
done
rm -rf "$CARRY/download"
du -sh "$CARRY"/*
