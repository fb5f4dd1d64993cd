"""Redaction: configured secrets and tokens learned at run time (ECR, Google)."""

from __future__ import annotations

import base64
import datetime as dt
from types import SimpleNamespace

from mlflow_dock.app import Components
from mlflow_dock.cloud.credentials import EcrCredentials, GoogleCredentials
from mlflow_dock.jobs.logs import REDACTED, BuildLogs, Redactor, redact
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
