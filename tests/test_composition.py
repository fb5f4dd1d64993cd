"""Tests for mlflow_dock.app's wiring of registry clients and of the lanes (the rest of the
composition root is exercised by the tests of what it builds)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from mlflow_dock.app import Components, Service
from mlflow_dock.cloud.providers import RegistryAccess
from mlflow_dock.jobs.model import JobKind, Lane
from mlflow_dock.settings import Settings
from support.fakes import RotatingCredentials
from support.webhooks import model_version_alias_created, model_version_created, signed_request

ECR_HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


class RecordingEcr:
    """The part of EcrRepositories the wiring hands to registry clients."""

    def __init__(self) -> None:
        self.deleted: list[tuple[str, str]] = []

    def delete_tag(self, name: str, tag: str) -> bool:
        self.deleted.append((name, tag))
        return True


def test_registry_clients_delete_tags_with_ecrs_own_api_on_ecr(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None, webhook_secret="whsec-wiring", docker_registry=ECR_HOST, data_dir=tmp_path
    )
    components = Components(settings)
    ecr = RecordingEcr()
    # What registry_access chose for an ECR registry without a password, minus AWS itself.
    components.__dict__["registry_access"] = RegistryAccess(RotatingCredentials(), ecr)  # type: ignore[arg-type]
    with components.registry(ECR_HOST) as client:
        assert client.delete_tag("team/iris", "champion") is True
    assert ecr.deleted == [("team/iris", "champion")]


def test_registry_clients_of_a_process_share_one_tls_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        _env_file=None,
        webhook_secret="whsec-wiring",
        docker_username="dock",
        docker_registry_password="pw",
        docker_registry="registry.example",
        data_dir=tmp_path,
    )
    components = Components(settings)
    contexts: list[object] = []

    def recording_client(host: str, **kwargs: object) -> object:
        contexts.append(kwargs["ssl_context"])
        return object()

    monkeypatch.setattr("mlflow_dock.app.RegistryClient", recording_client)
    components.registry("registry.example")
    components.registry("registry.example")
    assert isinstance(contexts[0], ssl.SSLContext) and contexts == [contexts[0]] * 2


class RecordingDispatcher:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def submit(self, job_id: str) -> None:
        self.sent.append(job_id)


def _celery_service(tmp_path: Path, **overrides: object) -> Service:
    settings = Settings(
        _env_file=None,
        webhook_secret="whsec-wiring",
        docker_username="dock",
        docker_registry_password="pw",
        docker_registry="127.0.0.1:5000",
        data_dir=tmp_path,
        executor="celery",
        broker_url="redis://127.0.0.1:9/0",  # never reached: nothing is started
        mlflow_write_back=False,
        reconcile_interval_seconds=0,
        **overrides,  # type: ignore[arg-type]
    )
    return Service(Components(settings))


def _accept(service: Service, payload: dict[str, object]) -> str:
    body, headers = signed_request(payload, "whsec-wiring")
    return service.accept(body, headers).job.id


@pytest.mark.parametrize("alias_concurrency", [1, 0])
def test_celery_replicas_run_alias_jobs_on_their_lane(tmp_path: Path, alias_concurrency: int):
    """Builds go to the broker; alias jobs to this replica's alias lane, never the broker,
    unless the replica has no alias lane (MLFLOW_DOCK_ALIAS_CONCURRENCY=0)."""
    service = _celery_service(tmp_path, alias_concurrency=alias_concurrency)
    dispatcher = RecordingDispatcher()
    service.dispatcher = dispatcher  # type: ignore[assignment]
    build = _accept(service, model_version_created("Iris", "1"))
    alias = _accept(service, model_version_alias_created("Iris", "prod", "1"))
    assert service.sweeper is not None
    if alias_concurrency:
        assert list(service.lanes.pools) == [Lane.ALIAS]
        assert dispatcher.sent == [build]
        # Neither does the leader's sweeper send them: the lanes of every replica poll.
        assert service.sweeper.kinds == frozenset({JobKind.BUILD})
    else:
        assert not service.lanes.pools
        assert dispatcher.sent == [build, alias]
        assert service.sweeper.kinds == frozenset(JobKind)
    service.components.close()


@pytest.mark.parametrize(
    ("registry", "max_layer_mib", "limit"),
    [
        ("ghcr.io/acme", None, 10 * 10**9),  # known per host
        ("ghcr.io/acme", 100, 100 << 20),  # the operator's wins
        ("ghcr.io/acme", 0, None),  # 0: no limit
        ("registry.example.com", None, None),
    ],
)
def test_model_layer_policy_from_the_settings(
    tmp_path: Path, registry: str, max_layer_mib: int | None, limit: int | None
) -> None:
    settings = Settings(
        _env_file=None,
        webhook_secret="whsec-wiring",
        docker_registry=registry,
        docker_username="robot",
        docker_registry_password="robot-password",
        data_dir=tmp_path,
        model_file_layer_mib=8,
        max_layer_mib=max_layer_mib,
    )
    policy = Components(settings).model_layers
    assert (policy.file_layer_bytes, policy.max_layer_bytes) == (8 << 20, limit)
    assert Components(settings).native._config.model_layers == policy
