"""Redaction: configured secrets and tokens learned at run time (ECR, Google)."""

from __future__ import annotations

import base64
import datetime as dt
from types import SimpleNamespace

from mlflow_dock.app import Components
from mlflow_dock.cloud.ecr import EcrCredentials
from mlflow_dock.cloud.google import GoogleCredentials
from mlflow_dock.jobs.logs import REDACTED, BuildLogs, Redactor, StoredBuildLogs, redact
from mlflow_dock.settings import Settings

ECR_HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


def test_longest_secret_first_and_short_values_ignored():
    assert redact("abcdef abc ab", ["abc", "abcdef", "ab"]) == f"{REDACTED} {REDACTED} ab"
    redactor = Redactor(["abc", "abcdef"])
    assert redactor("abcdef") == REDACTED


def test_learned_tokens_are_redacted_and_only_the_newest_kept():
    redactor = Redactor(["static"], keep_learned=2)
    for token in ("tok-one", "tok-two", "tok-three"):
        redactor.learn(token)
    redactor.learn("")  # nothing to learn
    assert redactor("tok-two tok-three static") == f"{REDACTED} {REDACTED} {REDACTED}"
    assert redactor("tok-one") == "tok-one"  # expired long ago; dropped to bound the work


def test_build_logs_use_a_shared_redactor(tmp_path):
    redactor = Redactor()
    logs = BuildLogs(tmp_path, secrets=redactor)
    redactor.learn("fetched-token-123")
    logs.append("0b6a-1", "docker login with fetched-token-123")
    assert logs.tail("0b6a-1") and "fetched-token-123" not in logs.tail("0b6a-1")[0]


class _FakeEcr:
    """The one ECR call the provider makes, answering like the API (token = b64(AWS:pw))."""

    def __init__(self, password: str) -> None:
        self.raw = base64.b64encode(f"AWS:{password}".encode()).decode()

    def get_authorization_token(self):
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=12)
        return {"authorizationData": [{"authorizationToken": self.raw, "expiresAt": expires}]}


def test_ecr_tokens_are_learned_when_fetched():
    redactor = Redactor()
    fake = _FakeEcr("ecr-password-from-aws")
    provider = EcrCredentials(
        registry_host=ECR_HOST, client_factory=lambda: fake, on_token=redactor.learn
    )
    assert provider.get().password == "ecr-password-from-aws"
    line = redactor(f"auth ecr-password-from-aws / {fake.raw}")
    assert "ecr-password-from-aws" not in line and fake.raw not in line


def test_google_tokens_are_learned_when_fetched():
    redactor = Redactor()

    class FakeGoogle:
        token = None
        expiry = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=1)

        def refresh(self, _request):
            self.token = "ya29.google-access-token"

    provider = GoogleCredentials(
        registry_host="europe-docker.pkg.dev",
        credentials_factory=FakeGoogle,
        request_factory=lambda: SimpleNamespace(),
        on_token=redactor.learn,
    )
    assert provider.get().password == "ya29.google-access-token"
    assert redactor("Bearer ya29.google-access-token") == f"Bearer {REDACTED}"


def test_the_composition_root_wires_providers_to_the_log_redactor(tmp_path):
    settings = Settings(
        _env_file=None,
        webhook_secret="whsec-wiring",
        docker_registry=ECR_HOST,
        data_dir=tmp_path,
    )
    components = Components(settings)
    provider = components.credentials
    assert isinstance(provider, EcrCredentials)
    provider._on_token("learned-through-wiring")
    assert "learned-through-wiring" not in components.logs.redact("x learned-through-wiring")


def test_stored_logs_are_shared_through_the_store_and_redacted(store):
    """Celery executor: a worker's lines are read back by any replica from the store."""
    worker_side = StoredBuildLogs(store, secrets=["hunter2-secret"])
    replica_side = StoredBuildLogs(store)
    for n in range(60):
        worker_side.append("job-a", f"step {n}")
    worker_side.append("job-a", "login with hunter2-secret\nsecond line")
    worker_side.append("job-b", "other job")

    tail = replica_side.tail("job-a", 3)
    assert [line.split(" ", 1)[1] for line in tail] == [
        "step 59",
        f"login with {REDACTED}",
        "second line",
    ]
    assert len(replica_side.tail("job-a", 500)) == 62
    assert replica_side.tail("job-b", 5)[0].endswith(" other job")
    assert replica_side.tail("nothing", 5) == []


def test_a_store_outage_drops_the_line_but_not_the_build(caplog):
    class DownStore:
        def append_log_lines(self, job_id: str, lines: object) -> None:
            raise ConnectionError("store down")

        def log_tail(self, job_id: str, lines: int) -> list[str]:
            return []

    logs = StoredBuildLogs(DownStore())
    logs.append("job-a", "a line")  # does not raise
    assert "not stored" in caplog.text


def test_the_celery_executor_keeps_logs_in_the_store(tmp_path):
    settings = Settings(
        _env_file=None,
        webhook_secret="whsec-wiring",
        data_dir=tmp_path,
        executor="celery",
        broker_url="redis://127.0.0.1:1/0",
    )
    assert isinstance(Components(settings).logs, StoredBuildLogs)
    embedded = Settings(_env_file=None, webhook_secret="whsec-wiring", data_dir=tmp_path)
    assert isinstance(Components(embedded).logs, BuildLogs)
