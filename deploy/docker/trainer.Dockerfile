# fabwatch sidecar trainer: TensorFlow (CPU build) + the serving code. For GPU training, start FROM a CUDA base
# and install tensorflow[and-cuda]: only then may deploy/k8s/trainer.yaml request a GPU.
# Build from the repository root:  docker build -f deploy/docker/trainer.Dockerfile -t fabwatch/trainer .
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY models ./models
COPY export ./export
# Versions are pinned in pyproject.toml's [train] extra.
# hadolint ignore=DL3013
RUN pip install ".[train]" \
 && useradd --uid 10001 --no-create-home fabwatch
USER 10001
WORKDIR /var/lib/fabwatch
ENV FABWATCH_HOME=/var/lib/fabwatch/state
EXPOSE 9109
ENTRYPOINT ["fabwatch", "trainer", "--registry", "/registry", "--store", "/var/lib/fabwatch/store", "--metrics-port", "9109"]
CMD ["--daily", "02:00"]
