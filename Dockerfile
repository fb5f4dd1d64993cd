# mlflow-dock service image: `mlflow-dock serve` on $PORT (default 8000) as uid 10001.
#
# Build (works with the classic builder and with BuildKit):
#
#   docker build -t mlflow-dock .
#   docker build -t mlflow-dock --build-arg BASE_IMAGE=my-mirror/python:3.11-slim \
#     --build-arg VERSION="$(git describe --tags --always)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#
#   Dependencies are installed at the versions pinned in uv.lock, with hash checking.
#   Behind a TLS-intercepting proxy or with a private index, put build-only inputs in an
#   optional `.build/` directory next to this file before building (keep it out of git):
#     .build/ca-bundle.crt   CA bundle pip should trust
#     .build/pip.conf        pip configuration (index-url, extra-index-url, ...)
#   They are only ever copied into the discarded builder stage: neither the files nor the
#   instructions that used them are in the final image or its history.
#
# Run: the default builder (native) needs no Docker Engine: it writes images straight into the
# registry, and without an engine jobs note "published untested":
#
#      docker run -d --name mlflow-dock -p 8000:8000 -v mlflow-dock-data:/var/lib/mlflow-dock \
#        -e MLFLOW_WEBHOOK_SECRET -e DOCKER_USERNAME -e DOCKER_REGISTRY_PASSWORD \
#        -e DOCKER_REGISTRY=registry.example.com -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#        mlflow-dock
#
# Smoke tests, the native builder's engine fallback and the engine builders (MLFLOW_DOCK_BUILDER=
# layered or mlflow) need a Docker Engine (or Podman's Docker-compatible socket), reached in one
# of two ways:
#
#   1. The host's engine socket, mounted. The service runs as a non-root user, so it also
#      needs the socket's group (access to this socket is root-equivalent on the host):
#
#      docker run -d --name mlflow-dock -p 8000:8000 \
#        -v /var/run/docker.sock:/var/run/docker.sock \
#        --group-add "$(stat -c %g /var/run/docker.sock)" \
#        -v mlflow-dock-data:/var/lib/mlflow-dock \
#        -e MLFLOW_WEBHOOK_SECRET -e DOCKER_USERNAME -e DOCKER_REGISTRY_PASSWORD \
#        -e DOCKER_REGISTRY=registry.example.com -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#        mlflow-dock
#
#   2. A remote engine (e.g. a docker:dind sidecar or a TLS-protected daemon):
#
#      docker run -d -p 8000:8000 -v mlflow-dock-data:/var/lib/mlflow-dock \
#        -e DOCKER_HOST=tcp://dind:2376 -e DOCKER_TLS_VERIFY=1 -e DOCKER_CERT_PATH=/certs \
#        -v dind-client-certs:/certs:ro \
#        -e MLFLOW_WEBHOOK_SECRET -e DOCKER_USERNAME -e DOCKER_REGISTRY_PASSWORD mlflow-dock
#
#   Required: MLFLOW_WEBHOOK_SECRET, and DOCKER_USERNAME with DOCKER_REGISTRY_PASSWORD except on
#   Amazon ECR and Google Artifact Registry hosts, which can use cloud credentials (a missing
#   one ends the container at once with exit code 2 and a one-line error). The job store and build
#   logs live in the volume /var/lib/mlflow-dock (MLFLOW_DOCK_DATA_DIR); a bind-mounted host
#   directory must be writable by uid 10001. `docker run --rm mlflow-dock --help` lists the
#   commands; `docker run ... mlflow-dock build MODEL VERSION` builds one version and exits.
#   The health check calls http://127.0.0.1:$PORT/health (https when MLFLOW_DOCK_TLS_CERT_FILE
#   is set), so it assumes MLFLOW_DOCK_HOST is left at 0.0.0.0 or a loopback address.

ARG BASE_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- builder
# Discarded after the build: holds the optional CA bundle / pip.conf, uv and hatchling.
FROM ${BASE_IMAGE} AS builder

ARG UV_VERSION=0.13.9
ARG HATCHLING_VERSION=1.33.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PIP_NO_INPUT=1 \
    LANG=C.UTF-8

# `.buil[d]` is a pattern, so a missing `.build/` matches nothing instead of failing the build;
# pyproject.toml is there only because COPY needs at least one existing source.
COPY pyproject.toml .buil[d] /tmp/build/

WORKDIR /src
COPY pyproject.toml uv.lock ./
# One RUN for everything that reaches the package index, so the optional CA bundle and
# pip.conf apply to all of it. Tools (uv for `export`, hatchling to build our wheel) get their
# own venv; the runtime venv is created without pip or setuptools and filled from outside.
RUN set -eu; \
    if [ -f /tmp/build/ca-bundle.crt ]; then export PIP_CERT=/tmp/build/ca-bundle.crt; fi; \
    if [ -f /tmp/build/pip.conf ]; then export PIP_CONFIG_FILE=/tmp/build/pip.conf; fi; \
    python3 -m venv /opt/build-tools; \
    /opt/build-tools/bin/python -m pip install --quiet \
        "uv==${UV_VERSION}" "hatchling==${HATCHLING_VERSION}"; \
    /opt/build-tools/bin/uv export --frozen --no-dev --no-emit-project --no-header --quiet \
        --format requirements-txt --output-file /tmp/requirements.txt; \
    python3 -m venv --without-pip /opt/mlflow-dock; \
    /opt/build-tools/bin/python -m pip --python /opt/mlflow-dock/bin/python install \
        --progress-bar off --require-hashes -r /tmp/requirements.txt

# The project itself last: a change in src/ rebuilds only this layer, offline.
COPY README.md ./
COPY src/ src/
RUN /opt/build-tools/bin/python -m pip wheel --quiet --no-deps --no-build-isolation \
        --wheel-dir /tmp/dist . \
 && /opt/build-tools/bin/python -m pip --python /opt/mlflow-dock/bin/python install \
        --quiet --no-deps --no-index /tmp/dist/*.whl \
 && /opt/mlflow-dock/bin/mlflow-dock --help >/dev/null

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

RUN groupadd --system --gid 10001 mlflow-dock \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow-dock \
        --shell /usr/sbin/nologin mlflow-dock \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/mlflow-dock

COPY --from=builder /opt/mlflow-dock /opt/mlflow-dock

ENV PATH=/opt/mlflow-dock/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    MLFLOW_DOCK_DATA_DIR=/var/lib/mlflow-dock

WORKDIR /var/lib/mlflow-dock
# Declared after the directory is created and chowned: a fresh named volume copies that owner.
VOLUME ["/var/lib/mlflow-dock"]
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, ssl, urllib.request as r; tls = bool(os.environ.get('MLFLOW_DOCK_TLS_CERT_FILE')); r.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + (os.environ.get('PORT') or '8000') + '/health', timeout=4, context=ssl._create_unverified_context() if tls else None)"]

ENTRYPOINT ["mlflow-dock"]
CMD ["serve"]

# Last, so that a new VERSION/REVISION does not invalidate any layer above.
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mlflow-dock" \
      org.opencontainers.image.description="Turn MLflow Model Registry events into serving images in a container registry" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
