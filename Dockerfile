# syntax=docker/dockerfile:1
#
# stream-worker: APOGEENet III on APOGEE spectra streamed through Kafka.
#
#   docker build -t registry.example.org/apogee/stream-worker:0.1.0 .
#   docker run --rm -v /path/to/models:/models:ro \
#     -e STREAM_WORKER__KAFKA__BOOTSTRAP_SERVERS='[kafka:9092]' \
#     -e STREAM_WORKER__ENGINE__WEIGHTS=/models/apogeenet/deconstructed_model \
#     registry.example.org/apogee/stream-worker:0.1.0
#
# One image for GPU and CPU nodes: torch from requirements.lock is the CUDA 13 build, used when
# the container sees a GPU (NVIDIA driver R580+ and the NVIDIA container runtime) and falling
# back to the CPU otherwise (engine.device: auto). Model weights are never baked in: mount them
# (docs/deployment.md). Settings: /etc/stream-worker/config.yaml (mount your own) plus
# STREAM_WORKER__<SECTION>__<KEY> environment overrides; the SASL password only from
# STREAM_WORKER_SASL_PASSWORD. Targets linux/amd64 (the lock's hashes are for that platform).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- dependencies: a virtual environment with the pinned dependencies only ----------------------
FROM ${PYTHON_IMAGE} AS dependencies

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
WORKDIR /src

# pip's downloads (the CUDA wheels are ~3 GB) stay in a build cache mount for the next build,
# never in a layer (where the index's responses are cacheable: a proxy that strips their caching
# headers leaves pip nothing to store).
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    /opt/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps -r requirements.lock

# ---- build: the worker itself, on top -------------------------------------------------------------
FROM dependencies AS build

# Built with the locked setuptools already in the venv (no unpinned build deps). Its files (the
# package, its dist-info, the console script) are staged apart, so the runtime stage copies the
# 5.5 GB of dependencies in a layer that only a new requirements.lock changes.
COPY pyproject.toml README.md ./
COPY stream_worker ./stream_worker
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation --no-compile . \
    && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib/python3.11/site-packages/stream_worker \
    && /opt/venv/bin/pip check \
    && mkdir -p /stage/opt/venv/bin /stage/opt/venv/lib/python3.11/site-packages \
    && cp -a /opt/venv/bin/stream-worker /stage/opt/venv/bin/ \
    && cp -a /opt/venv/lib/python3.11/site-packages/stream_worker \
             /opt/venv/lib/python3.11/site-packages/stream_worker-*.dist-info \
             /stage/opt/venv/lib/python3.11/site-packages/

# ---- runtime: no compilers, no pip caches, no source tree -------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed, unprivileged identity; Kubernetes runs it as runAsUser 10001 too (k8s/base).
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin worker \
    && mkdir -p /etc/stream-worker /models

COPY --from=dependencies /opt/venv /opt/venv
COPY --from=build /stage/ /
# The defaults, documented key by key; mount a ConfigMap over /etc/stream-worker to change them.
COPY config.yaml /etc/stream-worker/config.yaml

# HOME=/tmp: torch, astropy and friends write caches under $HOME, and /tmp is the only writable
# place when the root filesystem is read-only (k8s mounts an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /tmp
EXPOSE 9108
VOLUME ["/models"]

# Last, so that a new revision or date rebuilds only this metadata, not the 6 GB venv copy.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="stream-worker" \
      org.opencontainers.image.description="Real-time APOGEENet III stellar parameters for APOGEE spectra, streamed through Kafka" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="BSD-3-Clause" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# /healthz answers 200 while the process is alive (metrics.port 9108); no curl in a slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4).status == 200 else 1)"]

# SIGTERM makes the worker drain (finish, publish and commit the batch in hand) and exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["stream-worker"]
CMD ["--config", "/etc/stream-worker/config.yaml", "run"]
