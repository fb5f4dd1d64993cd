"""Configuration, read once at the edges (CLI, ASGI entry point) and passed down.

The six names MLflow users already know (`MLFLOW_WEBHOOK_SECRET`, `DOCKER_USERNAME`, ...) keep
their spelling; everything mlflow-dock adds carries the `MLFLOW_DOCK_` prefix, and MLflow's and
Docker's own variables (`MLFLOW_TRACKING_URI`, `DOCKER_HOST`) mean what they mean there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

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
from mlflow_dock.mlflow.sources import parse_allowed_sources
from mlflow_dock.oci.reference import split_registry

DEFAULT_DATA_DIR = Path("mlflow-dock-data")
# A password from a URL setting shorter than this is redacted only together with its URL or
# `user:password@`: alone, a short one ("dock") would hide common words in every log line.
MIN_BARE_PASSWORD = 8

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_MIN_SMOKE_MEMORY = 64 * 1024**2


def _memory_bytes(text: str) -> int:
    """Docker's memory notation ("512m", "4g", "1073741824"); units are powers of 1024."""
    match = _MEMORY.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 512m or 4g")
    exponent = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024**exponent)


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

    # May carry credentials (https://user:token@host): kept out of repr, redacted in logs.
    mlflow_tracking_uri: str = Field(
        default="http://localhost:5000", validation_alias=_env("MLFLOW_TRACKING_URI"), repr=False
    )
    docker_host: str | None = Field(default=None, validation_alias=_env("DOCKER_HOST"))
    # With DOCKER_HOST=tcp://...:2376: TLS to the engine, read as the docker CLI and SDK do
    # (any non-empty DOCKER_TLS_VERIFY verifies; certificates from DOCKER_CERT_PATH).
    docker_tls_verify: str | None = Field(default=None, validation_alias=_env("DOCKER_TLS_VERIFY"))
    docker_cert_path: str | None = Field(default=None, validation_alias=_env("DOCKER_CERT_PATH"))

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
    # native: how package layers are compressed; zstd only for clusters whose runtimes read it.
    layer_compression: Literal["gzip", "zstd"] = Field(
        default="gzip", validation_alias=_env("MLFLOW_DOCK_LAYER_COMPRESSION")
    )
    # native: share packed layers through the registry (repository mlflow-dock-cache).
    registry_layer_cache: bool = Field(
        default=True, validation_alias=_env("MLFLOW_DOCK_REGISTRY_LAYER_CACHE")
    )
    # The network of engine builds (they fetch packages); smoke tests never get one.
    build_network: str | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_BUILD_NETWORK")
    )
    smoke_test: bool = Field(default=True, validation_alias=_env("MLFLOW_DOCK_SMOKE_TEST"))
    # Model files of at least this many MiB (the weights) get a layer of their own, which a
    # version keeping them reuses without an upload; the rest of the model stays one layer.
    model_file_layer_mib: int = Field(
        default=32, ge=1, validation_alias=_env("MLFLOW_DOCK_MODEL_FILE_LAYER_MIB")
    )
    # The largest layer the registry accepts, in MiB; unset: known per host (GHCR 10 GB, ECR
    # 52,000 MiB), else no limit; 0: no limit. A bigger model file fails before any upload.
    max_layer_mib: int | None = Field(
        default=None, ge=0, validation_alias=_env("MLFLOW_DOCK_MAX_LAYER_MIB")
    )
    # Each smoke-test container's (full or warm) memory: bytes, or with a k/m/g unit as Docker
    # writes it ("512m", "4g"; binary units). No swap on top.
    smoke_memory: str = Field(default="4g", validation_alias=_env("MLFLOW_DOCK_SMOKE_MEMORY"))
    smoke_cpus: float = Field(
        default=2.0, gt=0, le=256, validation_alias=_env("MLFLOW_DOCK_SMOKE_CPUS")
    )
    smoke_pids: int = Field(default=512, ge=32, validation_alias=_env("MLFLOW_DOCK_SMOKE_PIDS"))
    # One deadline for a smoke test: container start, /ping and the input example.
    smoke_timeout_seconds: float = Field(
        default=120.0, ge=5, validation_alias=_env("MLFLOW_DOCK_SMOKE_TIMEOUT_SECONDS")
    )
    # A KServe Modelcar (`<repository>:<N>-modelcar`) beside every version's image: the model
    # under /models on a static busybox (imaging/modelcar.py). Off by default: it needs that
    # busybox binary, which mlflow-dock neither ships nor downloads, and it adds a tag per
    # version and alias that only KServe users want. On, it costs a config and a manifest.
    modelcar: bool = Field(default=False, validation_alias=_env("MLFLOW_DOCK_MODELCAR"))
    modelcar_busybox: Path = Field(
        default=Path("/bin/busybox"), validation_alias=_env("MLFLOW_DOCK_MODELCAR_BUSYBOX")
    )
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, validation_alias=_env("MLFLOW_DOCK_DATA_DIR"))
    # uv's wheel cache, base-image facts, layer scans: may be shared by the services and workers
    # of one machine (uv locks its cache; the others write through unique temporary names).
    cache_dir: Path | None = Field(default=None, validation_alias=_env("MLFLOW_DOCK_CACHE_DIR"))
    # Holds the database password: kept out of repr, redacted in logs (secret_values).
    database_url: str | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_DATABASE_URL"), repr=False
    )
    # 0: this process only accepts deliveries (an API replica; builds run elsewhere).
    build_concurrency: int = Field(
        default=1, ge=0, le=64, validation_alias=_env("MLFLOW_DOCK_BUILD_CONCURRENCY")
    )
    # Threads of the alias lane in every `serve` (alias and unalias jobs: a tag moved in the
    # registry, never waiting behind builds). 0: alias jobs run with the builds, as before.
    alias_concurrency: int = Field(
        default=1, ge=0, le=16, validation_alias=_env("MLFLOW_DOCK_ALIAS_CONCURRENCY")
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
    # What a model version's requirements.txt may ask for (imaging/requirements.py): named
    # requirements from the configured indexes, as wheels, unless the operator opts in.
    allow_direct_references: bool = Field(
        default=False, validation_alias=_env("MLFLOW_DOCK_ALLOW_DIRECT_REFERENCES")
    )
    allow_sdists: bool = Field(default=False, validation_alias=_env("MLFLOW_DOCK_ALLOW_SDISTS"))
    # Where artifacts may be downloaded from besides the tracking server's own (mlflow/sources.py):
    # comma- or space-separated prefixes such as s3://team-bucket/models/, or a bare `s3:`.
    allowed_sources: str = Field(default="", validation_alias=_env("MLFLOW_DOCK_ALLOWED_SOURCES"))
    # The tracking server's --artifacts-destination as a directory this service can read (a
    # shared volume): mlflow-artifacts: versions are then read there in place instead of being
    # downloaded through the tracking server (mlflow/client.py). None: always through it.
    artifacts_destination: Path | None = Field(
        default=None, validation_alias=_env("MLFLOW_DOCK_ARTIFACTS_DESTINATION")
    )
    # The board's sign-in cookie is Secure (sent over HTTPS only; browsers also accept it on
    # http://localhost). false only for a deployment served over plain HTTP on purpose.
    cookie_secure: bool = Field(default=True, validation_alias=_env("MLFLOW_DOCK_COOKIE_SECURE"))
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

    @field_validator("smoke_memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if _memory_bytes(value) < _MIN_SMOKE_MEMORY:
            raise ValueError("must be at least 64m")
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

    @field_validator("artifacts_destination")
    @classmethod
    def _directory_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"directory {value} does not exist")
        return value

    @field_validator("allowed_sources")
    @classmethod
    def _allowed_sources(cls, value: str) -> str:
        parse_allowed_sources(value)
        return value

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
    def _modelcar_busybox(self) -> Settings:
        if self.modelcar and not self.modelcar_busybox.is_file():
            raise ValueError(
                f"MLFLOW_DOCK_MODELCAR_BUSYBOX: file {self.modelcar_busybox} does not exist "
                "(Modelcars need a static busybox: Debian's busybox-static installs "
                "/bin/busybox)"
            )
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
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.data_dir / "cache"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def smoke_memory_bytes(self) -> int:
        return _memory_bytes(self.smoke_memory)

    @property
    def pip_extra_index_url_list(self) -> tuple[str, ...]:
        if self.pip_extra_index_urls is None:
            return ()
        raw = self.pip_extra_index_urls.get_secret_value().replace(",", " ")
        return tuple(part for part in raw.split() if part)

    @property
    def allowed_source_list(self) -> tuple[str, ...]:
        return parse_allowed_sources(self.allowed_sources)

    @property
    def secure_cookie(self) -> bool:
        """Whether the sign-in cookie is Secure: always when this process serves TLS itself."""
        return self.cookie_secure or self.tls_cert_file is not None

    def secret_values(self) -> tuple[str, ...]:
        """Every configured secret, for redacting build logs and error reasons.

        Besides the secrets themselves: the credentials inside every URL setting (the tracking
        URI, the database, the broker, the package indexes), since client errors quote a
        URL, or its password alone, rather than the setting.
        """
        values = list(self.webhook_secrets)
        if self.docker_registry_password is not None:
            values.append(self.docker_registry_password.get_secret_value())
        index_urls = list(self.pip_extra_index_url_list)
        if self.pip_index_url is not None:
            index_urls.append(self.pip_index_url.get_secret_value())
        for url in index_urls:
            values.append(url)
            values.extend(url_credentials(url))
        if self.api_token is not None:
            values.append(self.api_token.get_secret_value())
        if self.signing_key_password is not None:
            values.append(self.signing_key_password.get_secret_value())
        if self.broker_url is not None:
            broker = self.broker_url.get_secret_value()
            values.append(broker)
            # Redis/AMQP client errors quote the password alone, not the whole URL.
            values.extend(url_credentials(broker))
        for setting in (self.database_url, self.mlflow_tracking_uri):
            if setting and (found := url_credentials(setting)):
                values.append(setting)
                values.extend(found)
        return tuple(v for v in values if v)


def url_credentials(url: str) -> list[str]:
    """The credentials a URL carries, in each form a message may quote them.

    `user:password@` as written, and the password alone (also percent-decoded) when it is long
    enough to redact everywhere (MIN_BARE_PASSWORD).
    """
    try:
        parsed = urlsplit(url)
        password = parsed.password
    except ValueError:
        return []
    if not password:
        return []
    found = [parsed.netloc.rpartition("@")[0] + "@"]
    found.extend(form for form in {password, unquote(password)} if len(form) >= MIN_BARE_PASSWORD)
    return found


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
