# syntax=docker/dockerfile:1
# The node image: DICOM SCP, FHIR API, the outbox sender, and the CPU-only workers
# (demo engine, or a worker that talks to a vLLM server). No torch: `pip install .`
# without the worker extra. Build from the repository root:
#   docker build -f docker/node.Dockerfile -t medgemma-node:0.1.0 .
# Everything is installed here; nothing is downloaded when a container runs.

FROM python:3.12.8-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY workers ./workers
COPY sr_templates ./sr_templates
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /src

FROM python:3.12.8-slim-bookworm
LABEL org.opencontainers.image.title="medgemma-node" \
      org.opencontainers.image.description="DICOM SCP + FHIR R4 API of medgemma-node (no torch)"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    MEDGEMMA_NODE_STORAGE__DATA_DIR=/var/lib/medgemma/data
# one unprivileged user; the data directory (spool, results, logs, keys) is its own, 0700
RUN groupadd --system --gid 10001 medgemma \
    && useradd --system --uid 10001 --gid medgemma --home-dir /var/lib/medgemma \
       --shell /usr/sbin/nologin medgemma \
    && mkdir -p /var/lib/medgemma/data/spool \
    && chown -R medgemma:medgemma /var/lib/medgemma \
    && chmod -R 0700 /var/lib/medgemma
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/medgemma
EXPOSE 11112 8080
# C-ECHO to the SCP (`status` exits 1 when it does not answer); the api service overrides it
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["medgemma-node", "status", "--limit", "0"]
ENTRYPOINT ["medgemma-node"]
CMD ["serve"]
