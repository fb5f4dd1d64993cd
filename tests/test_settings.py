from __future__ import annotations

import pytest

from mlflow_dock.app import Components
from mlflow_dock.errors import ConfigError
from mlflow_dock.settings import load_settings
from support.elffiles import tiny_elf64

REQUIRED = {
    "MLFLOW_WEBHOOK_SECRET": "whsec-1",
    "DOCKER_USERNAME": "dock",
    "DOCKER_REGISTRY_PASSWORD": "pass-xyz",
}


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env file
    for name in list(__import__("os").environ):
        if name.startswith(("MLFLOW_DOCK_", "DOCKER_", "MLFLOW_WEBHOOK")) or name in (
            "PORT",
            "MAX_TIMESTAMP_AGE",
            "MLFLOW_TRACKING_URI",
        ):
            monkeypatch.delenv(name)

    def set_env(**values: str) -> None:
        for key, value in {**REQUIRED, **values}.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)

    return set_env


def test_defaults_with_only_required_variables(env):
    env()
    s = load_settings()
    assert s.docker_registry == "docker.io"
    assert s.max_timestamp_age == 300 and s.port == 8000
    assert s.build_concurrency == 1 and s.builder == "native" and s.smoke_test
    assert s.alias_concurrency == 1
    assert s.resolved_database_url.startswith("sqlite:///") and s.resolved_database_url.endswith(
        "jobs.db"
    )


def test_missing_webhook_secret_names_it(env):
    env(MLFLOW_WEBHOOK_SECRET=None)
    with pytest.raises(ConfigError, match=r"^MLFLOW_WEBHOOK_SECRET is required"):
        load_settings()


@pytest.mark.parametrize("name", ["DOCKER_USERNAME", "DOCKER_REGISTRY_PASSWORD"])
def test_missing_registry_credential_names_it_when_wired(env, name):
    # Whether a password is needed depends on the registry (ECR and Google use cloud
    # identities): that rule lives once, in cloud.providers, and applies when wiring.
    env(**{name: None})
    with pytest.raises(ConfigError, match=f"^{name} is required"):
        _ = Components(load_settings()).credentials


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "eighty", "PORT: "),
        ("PORT", "70000", "PORT: "),
        ("MAX_TIMESTAMP_AGE", "0", "MAX_TIMESTAMP_AGE: "),
        ("MLFLOW_DOCK_BUILD_CONCURRENCY", "-1", "MLFLOW_DOCK_BUILD_CONCURRENCY: "),
        ("MLFLOW_DOCK_ALIAS_CONCURRENCY", "17", "MLFLOW_DOCK_ALIAS_CONCURRENCY: "),
        ("MLFLOW_DOCK_SMOKE_TEST", "perhaps", "MLFLOW_DOCK_SMOKE_TEST: "),
        ("MLFLOW_DOCK_BUILDER", "kaniko", "MLFLOW_DOCK_BUILDER: "),
        ("MLFLOW_DOCK_TLS_CERT_FILE", "/nonexistent.pem", "MLFLOW_DOCK_TLS_CERT_FILE: "),
        ("MLFLOW_DOCK_BUILD_CA_BUNDLE", "/nonexistent.crt", "MLFLOW_DOCK_BUILD_CA_BUNDLE: "),
        ("MLFLOW_DOCK_ALLOWED_SOURCES", "team-bucket/models", "MLFLOW_DOCK_ALLOWED_SOURCES: "),
        ("MLFLOW_DOCK_ALLOWED_SOURCES", "s3://b/../x", "MLFLOW_DOCK_ALLOWED_SOURCES: "),
        ("MLFLOW_DOCK_ALLOW_SDISTS", "maybe", "MLFLOW_DOCK_ALLOW_SDISTS: "),
        ("MLFLOW_DOCK_COOKIE_SECURE", "sometimes", "MLFLOW_DOCK_COOKIE_SECURE: "),
        ("MLFLOW_DOCK_MODEL_FILE_LAYER_MIB", "0", "MLFLOW_DOCK_MODEL_FILE_LAYER_MIB: "),
        ("MLFLOW_DOCK_MAX_LAYER_MIB", "-1", "MLFLOW_DOCK_MAX_LAYER_MIB: "),
        ("MLFLOW_DOCK_MODELCAR", "kserve", "MLFLOW_DOCK_MODELCAR: "),
        ("MLFLOW_DOCK_ARTIFACTS_DESTINATION", "/nonexistent/mlartifacts", "MLFLOW_DOCK_ARTIF"),
    ],
)
def test_invalid_values_name_the_variable(env, name, value, message):
    env(**{name: value})
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_modelcars_are_off_by_default_and_need_a_busybox_when_on(env, tmp_path):
    env()
    assert load_settings().modelcar is False
    env(MLFLOW_DOCK_MODELCAR="true", MLFLOW_DOCK_MODELCAR_BUSYBOX=str(tmp_path / "busybox"))
    with pytest.raises(ConfigError, match=r"^MLFLOW_DOCK_MODELCAR_BUSYBOX: file .* busybox-static"):
        load_settings()


def test_a_busybox_that_cannot_run_in_a_modelcar_stops_the_start(env, tmp_path):
    dynamic = tmp_path / "busybox"
    dynamic.write_bytes(tiny_elf64(62, ["libc.so.6"]) + bytes(64))
    env(MLFLOW_DOCK_MODELCAR="true", MLFLOW_DOCK_MODELCAR_BUSYBOX=str(dynamic))
    with pytest.raises(ConfigError, match="dynamically linked"):
        _ = Components(load_settings()).modelcars


def test_tls_files_come_in_pairs(env, tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    env(MLFLOW_DOCK_TLS_CERT_FILE=str(cert))
    with pytest.raises(ConfigError, match="MLFLOW_DOCK_TLS_KEY_FILE"):
        load_settings()


def test_secrets_never_in_repr_or_errors(env):
    env(PORT="bad", MLFLOW_DOCK_PIP_INDEX_URL="https://u:idx-token@corp/simple")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "pass-xyz" not in str(info.value)
    env(MLFLOW_DOCK_PIP_INDEX_URL="https://u:idx-token@corp/simple", PORT="8000")
    s = load_settings()
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "whsec-1" not in text and "pass-xyz" not in text and "idx-token" not in text


def test_rotation_accepts_previous_secret(env):
    env(MLFLOW_DOCK_PREVIOUS_WEBHOOK_SECRET="whsec-0")
    assert load_settings().webhook_secrets == ("whsec-1", "whsec-0")


def test_registry_scheme_and_slash_are_stripped(env):
    env(DOCKER_REGISTRY="https://us-central1-docker.pkg.dev/proj/repo/")
    assert load_settings().docker_registry == "us-central1-docker.pkg.dev/proj/repo"


def test_dotenv_file_is_read(env, tmp_path):
    env(MLFLOW_WEBHOOK_SECRET=None)
    (tmp_path / ".env").write_text("MLFLOW_WEBHOOK_SECRET=from-dotenv\n")
    assert load_settings().webhook_secret.get_secret_value() == "from-dotenv"


def test_extra_index_urls_split_on_spaces_and_commas(env):
    env(MLFLOW_DOCK_PIP_EXTRA_INDEX_URLS="https://a/simple, https://b/simple")
    assert load_settings().pip_extra_index_url_list == ("https://a/simple", "https://b/simple")


def test_missing_signing_key_file_names_the_variable(env, tmp_path):
    env(MLFLOW_DOCK_SIGNING_KEY=str(tmp_path / "absent.key"))
    with pytest.raises(ConfigError, match=r"^MLFLOW_DOCK_SIGNING_KEY: file .* does not exist$"):
        load_settings()


def test_signing_key_password_is_a_secret(env, tmp_path):
    key = tmp_path / "cosign.key"
    key.write_text("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    env(MLFLOW_DOCK_SIGNING_KEY=str(key), MLFLOW_DOCK_SIGNING_KEY_PASSWORD="pw-Secret-123")
    settings = load_settings()
    assert "pw-Secret-123" in settings.secret_values()
    assert "pw-Secret-123" not in repr(settings)


def test_unusable_signing_key_is_one_config_error_when_wired(env, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    from support.cosign import encrypted_key

    key = tmp_path / "cosign.key"
    key.write_bytes(encrypted_key(ec.generate_private_key(ec.SECP256R1()), b"right", n=32768))
    env(MLFLOW_DOCK_SIGNING_KEY=str(key), MLFLOW_DOCK_SIGNING_KEY_PASSWORD="wrong")
    with pytest.raises(ConfigError, match="PASSWORD is wrong") as info:
        Components(load_settings()).signer  # noqa: B018
    assert "\n" not in str(info.value) and "wrong" not in str(info.value).replace("is wrong", "")
    env(MLFLOW_DOCK_SIGNING_KEY=str(key), MLFLOW_DOCK_SIGNING_KEY_PASSWORD="right")
    assert Components(load_settings()).signer is not None
    env(MLFLOW_DOCK_SIGNING_KEY=None, MLFLOW_DOCK_SIGNING_KEY_PASSWORD=None)
    assert Components(load_settings()).signer is None


def test_trust_settings_default_to_the_strict_choice(env):
    env()
    s = load_settings()
    assert not s.allow_direct_references and not s.allow_sdists
    assert s.allowed_source_list == () and s.cookie_secure and s.secure_cookie
    runner_policy = Components(s).build_config.requirements
    assert not runner_policy.allow_direct_references and runner_policy.wheels_only


def test_trust_settings_are_read_and_passed_down(env):
    env(
        MLFLOW_DOCK_ALLOW_DIRECT_REFERENCES="true",
        MLFLOW_DOCK_ALLOW_SDISTS="1",
        MLFLOW_DOCK_ALLOWED_SOURCES="s3://team/models/, gs://team-b",
        MLFLOW_DOCK_COOKIE_SECURE="false",
    )
    s = load_settings()
    assert s.allowed_source_list == ("s3://team/models/", "gs://team-b")
    assert not s.secure_cookie
    assert Components(s).source._destination is None
    policy = Components(s).build_config.requirements
    assert policy.allow_direct_references and not policy.wheels_only


def test_every_url_settings_credentials_are_redacted(env):
    env(
        MLFLOW_DOCK_DATABASE_URL="postgresql+psycopg://dock:db-Pass%2Fword-1@db:5432/jobs",
        MLFLOW_TRACKING_URI="https://alice:tracking-token-42@mlflow.example",
        MLFLOW_DOCK_BROKER_URL="redis://:broker-password-9@redis:6379/0",
        MLFLOW_DOCK_PIP_INDEX_URL="https://u:index-token-77@corp/simple",
        MLFLOW_DOCK_PIP_EXTRA_INDEX_URLS="https://v:extra-token-88@corp2/simple",
    )
    s = load_settings()
    secrets = s.secret_values()
    for value in (
        "db-Pass%2Fword-1",
        "db-Pass/word-1",  # decoded, as a driver's error would quote it
        "postgresql+psycopg://dock:db-Pass%2Fword-1@db:5432/jobs",
        "tracking-token-42",
        "alice:tracking-token-42@",
        "broker-password-9",
        "index-token-77",
        "extra-token-88",
    ):
        assert value in secrets, value
    from mlflow_dock.jobs.logs import Redactor

    line = Redactor(secrets)("API request to https://alice:tracking-token-42@mlflow.example failed")
    assert "tracking-token-42" not in line and "alice" not in line
    for text in (repr(s), str(s)):
        assert "db-Pass" not in text and "tracking-token-42" not in text


def test_urls_without_credentials_and_short_passwords_stay_readable(env):
    env(
        MLFLOW_TRACKING_URI="http://mlflow.example:5000",
        MLFLOW_DOCK_DATABASE_URL="postgresql+psycopg://dock:dock@db:5432/jobs",
    )
    secrets = load_settings().secret_values()
    assert "http://mlflow.example:5000" not in secrets  # logs may name the server
    # A four-letter password would hide the word everywhere ("mlflow-dock"); its URL forms not.
    assert "dock" not in secrets and "dock:dock@" in secrets
