# MLflow tracking server for compose.yaml: MLflow's own server with a PostgreSQL driver.
# The stock image (ghcr.io/mlflow/mlflow) has no driver for a SQL backend, and only a
# SQL-backed server delivers webhooks.
#
# Behind a TLS-intercepting proxy or with a private index, put build-only inputs next to this
# file (as for the repository's Dockerfile); only the discarded builder stage sees them:
#   .build/ca-bundle.crt   CA bundle pip and uv should trust
#   .build/pip.conf        pip configuration (used to install uv)
#   .build/uv.toml         uv configuration (index-url, ...; used to install MLflow)
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG MLFLOW_VERSION=3.17.2
ARG UV_VERSION=0.13.9
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120 \
    UV_NO_CACHE=1 UV_HTTP_TIMEOUT=120 LANG=C.UTF-8
# `.buil[d]` is a pattern, so a missing `.build/` matches nothing instead of failing the build.
COPY mlflow.Dockerfile .buil[d] /tmp/build/
# Virtualenvs, so the base only needs `python3 -m venv` (Debian's python3 has no pip); uv
# installs MLflow's ~90 packages in parallel, several times faster than pip.
RUN set -eu; \
    if [ -f /tmp/build/ca-bundle.crt ]; then \
        export PIP_CERT=/tmp/build/ca-bundle.crt SSL_CERT_FILE=/tmp/build/ca-bundle.crt; \
    fi; \
    if [ -f /tmp/build/pip.conf ]; then export PIP_CONFIG_FILE=/tmp/build/pip.conf; fi; \
    if [ -f /tmp/build/uv.toml ]; then export UV_CONFIG_FILE=/tmp/build/uv.toml; fi; \
    python3 -m venv /opt/build-tools; \
    /opt/build-tools/bin/python -m pip install --quiet "uv==${UV_VERSION}"; \
    python3 -m venv --without-pip /opt/mlflow; \
    /opt/build-tools/bin/uv pip install --python /opt/mlflow/bin/python \
        "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.1"

FROM ${BASE_IMAGE}
COPY --from=builder /opt/mlflow /opt/mlflow
ENV PATH=/opt/mlflow/bin:$PATH PYTHONUNBUFFERED=1 LANG=C.UTF-8
RUN useradd --system --uid 10002 --create-home --home-dir /home/mlflow mlflow \
 && install -d -o 10002 -g 10002 /var/lib/mlflow-artifacts
USER 10002
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
