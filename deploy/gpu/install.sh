#!/usr/bin/env bash
# Run on the GPU machine once every folder of .gpu-carry/ is there (see fetch.sh): joins the onnxruntime-gpu
# parts, checks the wheel's sha256 and installs it with the small wheels into .venv-gpu, a venv that also sees the
# machine's own packages (numpy, PyTorch and the CUDA/cuDNN libraries that come with it).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARRY=.gpu-carry
wheel=$(cat "$CARRY/wheels/ORT_WHEEL")
cat "$CARRY"/ort-*/"$wheel".part-* > "$CARRY/$wheel"
(cd "$CARRY" && sha256sum -c wheels/SHA256SUMS)
python3 -m venv --system-site-packages .venv-gpu
.venv-gpu/bin/pip install -q --no-index --find-links "$CARRY/wheels" "$CARRY/$wheel" \
    "typer>=0.12" "pydantic>=2.7,<3" "pydantic-settings>=2.3"
.venv-gpu/bin/python -c "import onnxruntime as ort; ort.preload_dlls(); print(ort.__version__, ort.get_available_providers())"
