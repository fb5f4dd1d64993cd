"""Configuration, read once at the edges (CLI, ASGI entry point) and passed down.

The six names MLflow users already know (`MLFLOW_WEBHOOK_SECRET`, `DOCKER_USERNAME`, ...) keep
their spelling; everything mlflow-dock adds carries the `MLFLOW_DOCK_` prefix, and MLflow's and
Docker's own variables (`MLFLOW_TRACKING_URI`, `DOCKER_HOST`) mean what they mean there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlflow_dock.errors import ConfigError
from mlflow_dock.oci.reference import split_registry

DEFAULT_DATA_DIR = Path("mlflow-dock-data")


def _env(name: str) -> Any:
    # validation_alias makes the error location the variable's name, which is what the one-line
    # startup error must show; the field name stays usable in code and tests.
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    webhook_secret: SecretStr = Field(validation_alias=_env("MLFLOW_WEBHOOK_SECRET"))
    previous_webhook_secret: SecretStr | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_PREVIOUS_WEBHOOK_SECRET")
    )
    # Optional only for Amazon ECR and Google registries, which can use cloud credentials.
    docker_username: str | None = Field(default=None, validation_alias=_env("DOCKER_USERNAME"))
    docker_registry_password: SecretStr | None = Field(
        default=None, validation_alias=_env("DOCKER_REGISTRY_PASSWORD")
    )
    docker_registry: str = Field(default="docker.io", validation_alias=_env("DOCKER_REGISTRY"))
    max_timestamp_age: int = Field(default=300, ge=1, validation_alias=_env("MAX_TIMESTAMP_AGE"))
    port: int = Field(default=8000, ge=1, le=65535, validation_alias=_env("PORT"))
    host: str = Field(default="0.0.0.0", validation_alias=_env("MLFLOW_DOCK_HOST"))  # noqa: S104

    mlflow_tracking_uri: str = Field(
        default="http://localhost:5000", validation_alias=_env("MLFLOW_TRACKING_URI")
    )
    docker_host: str | None = Field(default=None, validation_alias=_env("DOCKER_HOST"))

    image_namespace: str | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_IMAGE_NAMESPACE")
    )
    base_image: str | None = Field(default=None, validation_alias=_env("MLFLOW_DOCK_BASE_IMAGE"))
    # native (engine-free) by default; it hands what it cannot build to the engine itself.
    builder: Literal["layered", "mlflow", "native"] = Field(
        default="native", validation_alias=_env("MLFLOW_DOCK_BUILDER")
    )
    # Comma-separated OCI platforms for MLFLOW_DOCK_BUILDER=native; more than one: an index.
    platforms: str = Field(default="linux/amd64", validation_alias=_env("MLFLOW_DOCK_PLATFORMS"))
    # native: fall back to the Docker Engine (or Podman) when a model cannot be built natively.
    engine_fallback: bool = Field(
        default=True, validation_alias=_env("MLFLOW_DOCK_ENGINE_FALLBACK")
    )
    build_network: str | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_BUILD_NETWORK")
    )
    smoke_test: bool = Field(default=True, validation_alias=_env("MLFLOW_DOCK_SMOKE_TEST"))
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, validation_alias=_env("MLFLOW_DOCK_DATA_DIR"))
    database_url: str | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_DATABASE_URL")
    )
    # 0: this process only accepts deliveries (an API replica; builds run elsewhere).
    build_concurrency: int = Field(
        default=1, ge=0, le=64, validation_alias=_env("MLFLOW_DOCK_BUILD_CONCURRENCY")
    )
    max_attempts: int = Field(
        default=5, ge=1, le=100, validation_alias=_env("MLFLOW_DOCK_MAX_ATTEMPTS")
    )
    retry_backoff_seconds: float = Field(
        default=5.0, ge=0, validation_alias=_env("MLFLOW_DOCK_RETRY_BACKOFF_SECONDS")
    )
    max_backoff_seconds: float = Field(
        default=300.0, ge=0.1, validation_alias=_env("MLFLOW_DOCK_MAX_BACKOFF_SECONDS")
    )
    # How long a claimed job stays a worker's without a heartbeat; a killed worker's job is
    # taken over after at most this long. Renewed every third of it while the job runs.
    lease_seconds: float = Field(
        default=30.0, ge=1.0, validation_alias=_env("MLFLOW_DOCK_LEASE_SECONDS")
    )
    executor: Literal["embedded", "celery"] = Field(
        default="embedded", validation_alias=_env("MLFLOW_DOCK_EXECUTOR")
    )
    # redis://... or amqp://...; may carry a password, so it is a secret.
    broker_url: SecretStr | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_BROKER_URL")
    )
    # celery: a queued job whose message has not led to a claim for this long gets a new one
    # (the broker lost it); duplicates are harmless, a claim is exclusive.
    redeliver_seconds: float = Field(
        default=300.0, ge=1.0, validation_alias=_env("MLFLOW_DOCK_REDELIVER_SECONDS")
    )
    build_timeout_seconds: int = Field(
        default=3600, ge=10, validation_alias=_env("MLFLOW_DOCK_BUILD_TIMEOUT_SECONDS")
    )
    reconcile_interval_seconds: int = Field(
        default=300, ge=0, validation_alias=_env("MLFLOW_DOCK_RECONCILE_INTERVAL")
    )
    mlflow_write_back: bool = Field(
        default=True, validation_alias=_env("MLFLOW_DOCK_MLFLOW_WRITE_BACK")
    )
    ecr_endpoint_url: str | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_ECR_ENDPOINT_URL")
    )
    ecr_create_repositories: bool = Field(
        default=False, validation_alias=_env("MLFLOW_DOCK_ECR_CREATE_REPOSITORIES")
    )
    tls_cert_file: Path | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_TLS_CERT_FILE")
    )
    tls_key_file: Path | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_TLS_KEY_FILE")
    )
    registry_insecure: bool = Field(
        default=False, validation_alias=_env("MLFLOW_DOCK_REGISTRY_INSECURE")
    )
    # Bearer token for the read endpoints (/builds, the board, /metrics); the webhook stays
    # HMAC-only. Unset: reads are open, as on a private network.
    api_token: SecretStr | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_API_TOKEN")
    )
    # cosign-compatible signing of every published image (PEM ECDSA P-256 or a cosign key).
    signing_key: Path | None = Field(default=None, validation_alias=_env("MLFLOW_DOCK_SIGNING_KEY"))
    signing_key_password: SecretStr | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_SIGNING_KEY_PASSWORD")
    )
    build_ca_bundle: Path | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_BUILD_CA_BUNDLE")
    )
    # Index URLs may embed credentials (https://user:token@host/simple), so they are secrets.
    pip_index_url: SecretStr | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_PIP_INDEX_URL")
    )
    pip_extra_index_urls: SecretStr | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_PIP_EXTRA_INDEX_URLS")
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias=_env("MLFLOW_DOCK_LOG_LEVEL")
    )
    # json: one object per line with the job id, delivery id, model and version of the work
    # being done, for log pipelines; text: for people reading a terminal.
    log_format: Literal["text", "json"] = Field(
        default="text", validation_alias=_env("MLFLOW_DOCK_LOG_FORMAT")
    )

    @field_validator("docker_registry")
    @classmethod
    def _strip_registry(cls, value: str) -> str:
        host, prefix = split_registry(value)
        if not host:
            raise ValueError("must name a registry host")
        return f"{host}/{prefix}" if prefix else host

    @field_validator("tls_cert_file", "tls_key_file", "build_ca_bundle", "signing_key")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @field_validator("platforms")
    @classmethod
    def _platforms(cls, value: str) -> str:
        names = [part.strip() for part in value.split(",") if part.strip()]
        allowed = {"linux/amd64", "linux/arm64", "linux/arm64/v8"}
        unknown = [name for name in names if name not in allowed]
        if not names or unknown:
            raise ValueError(
                f"unsupported platform(s) {', '.join(unknown) or '(none)'}: "
                "expected linux/amd64 and/or linux/arm64"
            )
        return ",".join(dict.fromkeys(names))

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = (
                "MLFLOW_DOCK_TLS_KEY_FILE"
                if self.tls_key_file is None
                else ("MLFLOW_DOCK_TLS_CERT_FILE")
            )
            raise ValueError(f"{missing}: must be set together with its pair")
        return self

    @model_validator(mode="after")
    def _broker_for_celery(self) -> Settings:
        if self.executor == "celery" and self.broker_url is None:
            raise ValueError("MLFLOW_DOCK_BROKER_URL: required when MLFLOW_DOCK_EXECUTOR=celery")
        return self

    @property
    def webhook_secrets(self) -> tuple[str, ...]:
        """Current secret first; the previous one is accepted during a rotation."""
        secrets = [self.webhook_secret.get_secret_value()]
        if self.previous_webhook_secret is not None:
            secrets.append(self.previous_webhook_secret.get_secret_value())
        return tuple(secrets)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def pip_extra_index_url_list(self) -> tuple[str, ...]:
        if self.pip_extra_index_urls is None:
            return ()
        raw = self.pip_extra_index_urls.get_secret_value().replace(",", " ")
        return tuple(part for part in raw.split() if part)

    def secret_values(self) -> tuple[str, ...]:
        """Every configured secret, for redacting build logs and error reasons."""
        values = list(self.webhook_secrets)
        if self.docker_registry_password is not None:
            values.append(self.docker_registry_password.get_secret_value())
        if self.pip_index_url is not None:
            values.append(self.pip_index_url.get_secret_value())
        values.extend(self.pip_extra_index_url_list)
        if self.api_token is not None:
            values.append(self.api_token.get_secret_value())
        if self.signing_key_password is not None:
            values.append(self.signing_key_password.get_secret_value())
        if self.broker_url is not None:
            broker = self.broker_url.get_secret_value()
            values.append(broker)
            # Redis/AMQP client errors quote the password alone, not the whole URL.
            values.append(urlsplit(broker).password or "")
        return tuple(v for v in values if v)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and `.env`), or raise ConfigError with one line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    name = ".".join(str(part) for part in error["loc"]) or "configuration"
    if error["type"] == "missing":
        return f"{name} is required but not set"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message
    return f"{name}: {message}"
