# syntax=docker/dockerfile:1
# The GPU worker image: torch (CUDA 12 build from PyPI: the CUDA runtime comes in its
# nvidia-* wheels; the host needs only the NVIDIA driver and container toolkit) and
# transformers from the `worker` extra. The model is NOT in the image: mount its directory
# read-only at /models/medgemma. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t medgemma-worker:0.1.0 .
# Everything is installed here; at run time the worker reads only the mounted model
# (HF_HUB_OFFLINE=1, engine.local_files_only) and never reaches a hub.

FROM python:3.12.8-slim-bookworm AS build
# the torch the test suite runs with (scripts/test.sh); override with --build-arg
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY workers ./workers
COPY sr_templates ./sr_templates
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir "/src[worker]"

FROM python:3.12.8-slim-bookworm
LABEL org.opencontainers.image.title="medgemma-worker" \
      org.opencontainers.image.description="medgemma-node Celery worker with MedGemma on CUDA"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/var/lib/medgemma/hf \
    MEDGEMMA_NODE_STORAGE__DATA_DIR=/var/lib/medgemma/data \
    MEDGEMMA_NODE_ENGINE__NAME=medgemma \
    MEDGEMMA_NODE_ENGINE__MODEL=/models/medgemma \
    MEDGEMMA_NODE_ENGINE__LOCAL_FILES_ONLY=true \
    MEDGEMMA_NODE_ENGINE__DEVICE=cuda
RUN groupadd --system --gid 10001 medgemma \
    && useradd --system --uid 10001 --gid medgemma --home-dir /var/lib/medgemma \
       --shell /usr/sbin/nologin medgemma \
    && mkdir -p /var/lib/medgemma/data/spool /var/lib/medgemma/hf /models/medgemma \
    && chown -R medgemma:medgemma /var/lib/medgemma \
    && chmod -R 0700 /var/lib/medgemma
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/medgemma
# the worker answers a Celery ping under its node name (medgemma@<container hostname>)
HEALTHCHECK --interval=60s --timeout=20s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "celery -A workers.celery_app:app inspect ping --timeout 10 -d medgemma@$HOSTNAME"]
ENTRYPOINT ["medgemma-node"]
CMD ["worker", "--queues", "preread,followup", "--concurrency", "1"]
