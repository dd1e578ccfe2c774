# The project's own image: the `specstream` command with the s3 extra, for the compose stack
# (infra/compose.yaml) and Kubernetes (infra/k8s/). Build from the repository root:
#   docker build -f infra/specstream.Dockerfile -t specstream:0.1.0 .
# CPU wheels of torch keep it small enough for the local stack; for GPU generator and trainer nodes
# build FROM a CUDA base (BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 with python3.11) and drop the
# CPU index (TORCH_INDEX=https://pypi.org/simple).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
# What the wheel needs (pyproject's hatch targets): the package, the broker POM, the README.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY infra/kafka ./infra/kafka
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" ".[s3]" && rm -rf /src
WORKDIR /work
# Run as a user, not root; the config is mounted read-only at /etc/specstream/run.yaml; /models is
# owned by that user so the compose stack's named volume mounted there is writable.
RUN useradd --create-home --uid 10001 specstream && mkdir -p /models && chown specstream /work /models
USER specstream
ENV PYTHONUNBUFFERED=1 SPECSTREAM_HOME=/work/.specstream
CMD ["specstream", "--help"]
