# The service's images, one target each (docker-compose.yml builds them):
#   api         the API and `modelpress migrate` / `keys`: `pip install .` (no ML stack: that is the `worker` extra)
#   worker-cpu  a CPU worker: `pip install '.[worker]'` with torch's CPU wheels
#   worker-gpu  a GPU worker on a CUDA image: CUDA torch from PyPI, onnxruntime-gpu in place of onnxruntime (both
#               provide the `onnxruntime` module)
# Keep TORCH_VERSION equal to the torch pin of pyproject.toml (tests/test_deploy.py checks it).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MODELPRESS_HOME=/var/lib/modelpress
WORKDIR /srv/modelpress
RUN mkdir -p /var/lib/modelpress

FROM python-base AS api
COPY . .
RUN pip install .
EXPOSE 8000
CMD ["modelpress", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM python-base AS worker-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
RUN pip install --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
COPY . .
RUN pip install '.[worker]'
CMD ["modelpress", "worker", "--queues", "cpu", "--concurrency", "2"]

FROM ${CUDA_IMAGE} AS worker-gpu
ARG TORCH_VERSION
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MODELPRESS_HOME=/var/lib/modelpress \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv && mkdir -p /var/lib/modelpress
WORKDIR /srv/modelpress
# PyPI's Linux torch wheels are the CUDA builds.
RUN pip install "torch==$TORCH_VERSION"
COPY . .
# onnxruntime-gpu of the same version replaces onnxruntime; one must go before the other comes, as both write
# the same `onnxruntime` package.
RUN pip install '.[worker]' \
    && ort_version="$(pip show onnxruntime | sed -n 's/^Version: //p')" \
    && pip uninstall -y onnxruntime && pip install "onnxruntime-gpu==$ort_version"
CMD ["modelpress", "worker", "--queues", "gpu", "--concurrency", "1"]
