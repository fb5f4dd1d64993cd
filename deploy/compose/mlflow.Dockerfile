# MLflow tracking server for compose.yaml: MLflow's own server with a PostgreSQL driver.
# The stock image (ghcr.io/mlflow/mlflow) has no driver for a SQL backend, and only a
# SQL-backed server delivers webhooks.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8
RUN python3 -m pip install --progress-bar off "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.1" \
 && useradd --system --uid 10002 --create-home --home-dir /home/mlflow mlflow \
 && install -d -o 10002 -g 10002 /var/lib/mlflow-artifacts
USER 10002
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
