"""Fixtures that start the real collaborators: Docker Engine, a registry, an MLflow server.

Session-scoped where startup is expensive (MLflow server ~16s, base image build ~2 min cold);
everything a test creates in those shared servers must use unique names (see ``model_name``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import docker
import pytest
from mlflow.entities.webhook import Webhook

from mlflow import MlflowClient
from support.servers import (
    MlflowServer,
    RegistryServer,
    ServiceProcess,
    ensure_base_image,
    log_tail,
    missing_integration_prerequisites,
    service_environment,
    start_mlflow_server,
    start_registry,
    start_service,
)

_prerequisites_cache: list[str] | None = None


def _missing_prerequisites() -> list[str]:
    global _prerequisites_cache
    if _prerequisites_cache is None:
        _prerequisites_cache = missing_integration_prerequisites()
    return _prerequisites_cache


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("integration") is None:
        return
    missing = _missing_prerequisites()
    if not missing:
        return
    reason = "integration prerequisites missing: " + "; ".join(missing)
    # On CI a missing Docker means a broken machine, not an optional feature: skipping would
    # turn the whole integration suite silently green.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true, so this is an error; run `bash .ci/run`)", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    # Lets fixtures see at teardown whether the test failed, to dump service logs only then.
    report = yield
    setattr(item, f"_report_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"_report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


# --------------------------------------------------------------------------- session


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image() -> str:
    """Tag of the offline-built Debian + Python 3.11 base (prebuilt by .ci/run on CI)."""
    return ensure_base_image()


@pytest.fixture(scope="session")
def registry_base_image(
    registry: RegistryServer, docker_client: docker.DockerClient, base_image: str
) -> str:
    """The test base image in the test registry, as a user's base is in theirs.

    The services under test get this as MLFLOW_DOCK_BASE_IMAGE, so the default (native)
    builder reads it through the registry API; the engine keeps the same name locally, so
    engine builds (layered, stock, the fallback) start from it without pulling.
    """
    repository = f"{registry.host}/mlflow-dock-test/base"
    tag = "bookworm-py3.11"
    docker_client.images.get(base_image).tag(repository, tag)
    for chunk in docker_client.api.push(
        repository, tag, stream=True, decode=True, auth_config=registry.auth_config
    ):
        assert "error" not in chunk, chunk
    return f"{repository}:{tag}"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry"), "dock", secrets.token_urlsafe(18))
    yield server
    server.stop()
    # Pushed serving images run to hundreds of MB; pytest keeps 3 old basetemps, logs suffice.
    shutil.rmtree(server.storage_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLFLOW_DOCK_CACHE_DIR for the services of this session (of this xdist worker).

    uv's wheel cache in it saves every service's first native build the downloads of the same
    wheels (a few seconds each); tests about a fresh worker give theirs its own directory.
    """
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


# --------------------------------------------------------------------------- per test


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """Unique registered-model name, with a space and capitals like real ones ('/' is illegal)."""
    return f"Dock {request.node.name[:40]} {uuid.uuid4().hex[:8]}"


@pytest.fixture
def mlflow_client(mlflow_server: MlflowServer) -> MlflowClient:
    # Explicit registry_uri: without it MlflowClient falls back to the process-global registry
    # URI, which is a local sqlite file, not this server.
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


WebhookFactory = Callable[..., Webhook]


@pytest.fixture
def webhook_factory(mlflow_client: MlflowClient) -> Iterator[WebhookFactory]:
    """Create webhooks in the shared MLflow server; all are deleted at teardown.

    Webhooks are global to the server: one left behind would keep firing (and retrying
    against a dead port) for every later test's model versions.
    """
    created: list[str] = []

    def create(
        url: str,
        secret: str | None,
        events: Sequence[str] = ("model_version.created", "model_version_alias.created"),
        name: str | None = None,
    ) -> Webhook:
        hook = mlflow_client.create_webhook(
            name=name or f"test-{uuid.uuid4().hex[:8]}",
            url=url,
            events=list(events),
            secret=secret,
        )
        created.append(hook.webhook_id)
        # The server caches webhooks per event for MLFLOW_WEBHOOK_CACHE_TTL (1s here): an event
        # fired within 1s of the last lookup would still use the list without this webhook.
        time.sleep(1.2)
        return hook

    yield create
    for webhook_id in created:
        try:
            mlflow_client.delete_webhook(webhook_id)
        except Exception as exc:  # teardown must not mask the test's own outcome
            print(f"could not delete webhook {webhook_id}: {exc}")


class ServiceFactory:
    """Starts ``mlflow-dock serve`` processes wired to the session's registry and MLflow.

    ``factory(**overrides)`` starts one; an override of ``None`` removes that variable.
    ``factory.env()`` gives the env without starting anything.
    """

    def __init__(
        self,
        tmp_path: Path,
        registry: RegistryServer,
        mlflow_server: MlflowServer,
        base_image: str,
        cache_dir: Path | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.cache_dir = cache_dir
        self.registry = registry
        self.mlflow_server = mlflow_server
        self.base_image = base_image
        self.secret = secrets.token_urlsafe(32)
        self.services: list[ServiceProcess] = []

    def env(self, workdir: Path | None = None, **overrides: str | None) -> dict[str, str]:
        workdir = workdir or self.tmp_path / f"service-{len(self.services)}"
        env = service_environment(
            self.registry,
            self.mlflow_server,
            secret=self.secret,
            data_dir=workdir / "data",
            base_image=self.base_image,
        )
        if self.cache_dir is not None:
            env["MLFLOW_DOCK_CACHE_DIR"] = str(self.cache_dir)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def __call__(
        self, *, startup_timeout: float = 180.0, **overrides: str | None
    ) -> ServiceProcess:
        workdir = self.tmp_path / f"service-{len(self.services)}"
        env = self.env(workdir, **overrides)
        Path(env.get("MLFLOW_DOCK_DATA_DIR", workdir / "data")).mkdir(parents=True, exist_ok=True)
        service = start_service(env, workdir, startup_timeout=startup_timeout)
        self.services.append(service)
        return service

    def stop_all(self) -> None:
        for service in self.services:
            service.stop()


@pytest.fixture
def service_factory(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    registry: RegistryServer,
    mlflow_server: MlflowServer,
    registry_base_image: str,
    shared_cache_dir: Path,
) -> Iterator[ServiceFactory]:
    factory = ServiceFactory(
        tmp_path, registry, mlflow_server, registry_base_image, cache_dir=shared_cache_dir
    )
    yield factory
    factory.stop_all()
    if _test_failed(request):
        for service in factory.services:
            print(f"----- {service.log_path} (tail) -----\n{log_tail(service.log_path, 200)}")


@pytest.fixture(scope="module")
def module_service_factory(
    tmp_path_factory: pytest.TempPathFactory,
    registry: RegistryServer,
    mlflow_server: MlflowServer,
    registry_base_image: str,
    shared_cache_dir: Path,
) -> Iterator[ServiceFactory]:
    """``service_factory`` for services a whole module shares (mark the module with an
    ``xdist_group``, or every worker that runs one of its tests starts its own)."""
    factory = ServiceFactory(
        tmp_path_factory.mktemp("module-services"),
        registry,
        mlflow_server,
        registry_base_image,
        cache_dir=shared_cache_dir,
    )
    yield factory
    for service in factory.services:
        print(f"----- {service.log_path} (tail) -----\n{log_tail(service.log_path, 100)}")
    factory.stop_all()
