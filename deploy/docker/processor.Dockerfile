# fabwatch stream processor on a GPU: CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu, no TensorFlow.
# Build from the repository root:  docker build -f deploy/docker/processor.Dockerfile -t fabwatch/processor .
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/fabwatch \
    PATH=/opt/fabwatch/bin:$PATH

# The distribution's python3.12 follows the pinned CUDA base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/fabwatch

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY models ./models
COPY export ./export
# The serving install, with the CUDA build of onnxruntime in place of the CPU one. PyPI's onnxruntime-gpu
# 1.31 is built for CUDA 13: pinned, so that it matches the base image.
RUN pip install . \
 && pip uninstall -y onnxruntime \
 && pip install "onnxruntime-gpu==1.31.1"

# TensorRT's engine cache must be writable (the registry is read-only): a volume there keeps it across restarts.
RUN useradd --uid 10001 --no-create-home fabwatch \
 && mkdir -p /var/cache/fabwatch/trt \
 && chown 10001 /var/cache/fabwatch/trt
USER 10001
WORKDIR /var/lib/fabwatch
ENV FABWATCH_HOME=/var/lib/fabwatch/state \
    FABWATCH_TRT_CACHE=/var/cache/fabwatch/trt
EXPOSE 9108
# KAFKA_BOOTSTRAP_SERVERS and FABWATCH_* configure it; the registry is a read-only volume.
ENTRYPOINT ["fabwatch", "serve", "--registry", "/registry", "--metrics-port", "9108"]
