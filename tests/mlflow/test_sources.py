"""Where artifacts may be downloaded from: the tracking server, plus the operator's prefixes."""

from __future__ import annotations

import pytest

from mlflow_dock.errors import PermanentError, is_retryable
from mlflow_dock.mlflow.sources import AllowedSources, SourceNotAllowed, parse_allowed_sources

TRACKING = "https://mlflow.example:5000/base"


def allowed(uri: str, *prefixes: str, tracking: str = TRACKING) -> bool:
    try:
        AllowedSources(tracking, prefixes).check(uri)
    except SourceNotAllowed:
        return False
    return True


@pytest.mark.parametrize(
    "uri",
    [
        "mlflow-artifacts:/1/models/m-abc/artifacts",
        "mlflow-artifacts:///1/models/m-abc/artifacts",
        "mlflow-artifacts://mlflow.example:5000/1/x",
        "https://mlflow.example:5000/base/api/2.0/mlflow-artifacts/artifacts/1/x",
    ],
)
def test_the_tracking_servers_own_artifacts_are_allowed_by_default(uri):
    assert allowed(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "mlflow-artifacts://evil.example/1/x",
        "mlflow-artifacts://mlflow.example:5001/1/x",
        "https://mlflow.example:5000/base/other",
        "http://mlflow.example:5000/base/api/2.0/mlflow-artifacts/artifacts/1/x",
        "http://127.0.0.1:9/evil",
        "http://169.254.169.254/latest/meta-data/",
        "s3://any-bucket/models",
        "gs://any-bucket/models",
        "file:///etc",
        "/etc/passwd",
        "mlruns/1/abc",
        "ftp://host/x",
    ],
)
def test_anything_else_is_refused_by_default(uri):
    assert not allowed(uri)


def test_a_local_tracking_store_allows_nothing_by_default():
    assert not allowed("mlflow-artifacts:/1/x", tracking="sqlite:///mlflow.db")
    assert not allowed("file:///srv/mlruns/1/x", tracking="sqlite:///mlflow.db")
    assert allowed("file:///srv/mlruns/1/x", "file:///srv/mlruns/", tracking="sqlite:///mlflow.db")


def test_prefixes_match_at_path_boundaries_only():
    prefix = "s3://team-bucket/models/"
    assert allowed("s3://team-bucket/models/1/m-abc/artifacts", prefix)
    assert allowed("s3://team-bucket/models", prefix)
    assert not allowed("s3://team-bucket/models-other/x", prefix)
    assert not allowed("s3://team-bucket-evil/models/x", prefix)
    assert not allowed("s3://team-bucket/", prefix)
    assert allowed("s3://team-bucket/anything", "s3://team-bucket")
    assert not allowed("gs://team-bucket/models/x", prefix)


def test_dot_dot_never_passes_even_percent_encoded():
    prefix = "s3://team-bucket/models/"
    for uri in (
        "s3://team-bucket/models/../secrets",
        "s3://team-bucket/models/%2e%2e/secrets",
        "s3://team-bucket/models/%252e%252e/secrets",
        "mlflow-artifacts:/1/../../x",
    ):
        assert not allowed(uri, prefix), uri


def test_a_bare_scheme_allows_every_location_of_it():
    assert allowed("s3://any-bucket/x", "s3:")
    assert allowed("gs://b/x", "s3:", "gs://")
    assert not allowed("https://evil.example/x", "s3:")


def test_credentials_in_a_source_are_ignored_for_matching_and_not_shown():
    prefix = "https://artifacts.example/team/"
    assert allowed("https://user:pw@artifacts.example/team/x", prefix)
    with pytest.raises(SourceNotAllowed) as info:
        AllowedSources(TRACKING).check("https://alice:hunter22@evil.example/x?sig=abc")
    assert "hunter22" not in str(info.value) and "sig=abc" not in str(info.value)
    assert "evil.example" in str(info.value)
    assert isinstance(info.value, PermanentError) and not is_retryable(info.value)


def test_the_setting_is_parsed_and_bad_entries_are_named():
    assert parse_allowed_sources("s3://a/x/, gs://b  file:///srv/mlruns") == (
        "s3://a/x/",
        "gs://b",
        "file:///srv/mlruns",
    )
    assert parse_allowed_sources("") == ()
    for bad in ("team-bucket/models", "s3://a/../b", "https://h/x?token=1", "https://u:p@h/x"):
        with pytest.raises(ValueError, match="prefix"):
            parse_allowed_sources(bad)
