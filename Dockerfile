# gptserve image. CPU by default. For NVIDIA GPUs set TORCH_INDEX_URL to a PyTorch CUDA index (.../whl/cu130)
# or to nothing, which takes torch from the default index, whose Linux wheels are CUDA builds that bring their
# own CUDA runtime; the host needs only the NVIDIA driver and container toolkit:
#   docker build -t gptserve:cpu .
#   docker build -t gptserve:cuda --build-arg TORCH_INDEX_URL= .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/gptserve \
    PATH=/opt/gptserve/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# g++ compiles the C++ CPU kernels (models/csrc) once, below, as torch extensions.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

# Layers from the least to the most often changed: torch, then the other dependencies, then our source.
RUN python -m venv "$VIRTUAL_ENV" \
    && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY models ./models
COPY server ./server
RUN pip install --no-deps .

# Build the CPU kernels into the image (x86-64 builds carry clones for AVX2 CPUs and for any other), owned by
# the server's user: at start torch only checks they are up to date, which takes a lock file beside them.
ENV TORCH_EXTENSIONS_DIR=/opt/torch_extensions
RUN useradd --system --create-home --uid 10001 --user-group gptserve \
    && mkdir -p /models \
    && chown gptserve:gptserve /models \
    && python -P -c 'from models.cpu_kernels import cpu_kernels_loaded; assert cpu_kernels_loaded()' \
    && chown -R gptserve:gptserve "$TORCH_EXTENSIONS_DIR"
VOLUME ["/models"]

# The server binds loopback unless told otherwise; in a container it must listen on every interface.
ENV GPTSERVE_HOST=0.0.0.0 \
    GPTSERVE_PORT=8000
EXPOSE 8000

# Numeric, so that orchestrators can verify the container does not run as root.
USER 10001:10001
WORKDIR /home/gptserve

# Healthy means ready to serve (/ready: models loaded, engines running), not merely alive (/health); the probe
# (server/healthcheck.py) follows GPTSERVE_PORT and asks over HTTPS when GPTSERVE_SSL_CERTFILE is set.
# Loading a large checkpoint on a CPU takes minutes: the start period keeps the container from counting as unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]

ENTRYPOINT ["gptserve"]
