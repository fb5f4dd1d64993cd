"""The build board rendered by the real app (TestClient) over a real SQLite store."""

from __future__ import annotations

import json
import re
import time

import pytest
from fastapi.testclient import TestClient

from mlflow_dock.app import Components, Service, create_asgi_app
from mlflow_dock.errors import PermanentError
from mlflow_dock.intake.board import mlflow_ui_base, version_link
from mlflow_dock.intake.signatures import sign
from mlflow_dock.jobs.model import JobOutcome
from mlflow_dock.jobs.steps import enter_step
from mlflow_dock.settings import Settings

SECRET = "whsec-board-test"
TOKEN = "read-token-for-the-board"
DIGEST = "sha256:" + "d" * 64


class StepRunner:
    """Goes through the steps a real build takes; fails versions listed in `failing`."""

    def __init__(self) -> None:
        self.failing: dict[str, Exception] = {}

    def run(self, job, log):
        enter_step("resolve")
        log(f"resolving {job.model_name} {job.version}")
        if job.version in self.failing:
            raise self.failing[job.version]
        enter_step("build")
        enter_step("smoke")
        enter_step("push")
        ref = f"127.0.0.1:5000/models/m:{job.alias or job.version}"
        return JobOutcome(image=ref, digest=DIGEST, tags=(ref,))


def make_settings(tmp_path, **extra) -> Settings:
    return Settings(
        _env_file=None,
        webhook_secret=SECRET,
        docker_username="dock",
        docker_registry_password="registry-pass-board",
        docker_registry="127.0.0.1:5000",
        data_dir=tmp_path,
        retry_backoff_seconds=0.05,
        max_attempts=2,
        mlflow_write_back=False,
        reconcile_interval_seconds=0,
        smoke_test=False,
        **{"mlflow_tracking_uri": "http://mlflow.example:5000", **extra},
    )


def client_for(
    settings: Settings, runner: StepRunner, base_url: str = "http://testserver"
) -> TestClient:
    components = Components(settings)
    components.runner = runner  # type: ignore[assignment]
    return TestClient(create_asgi_app(settings, service=Service(components)), base_url=base_url)


@pytest.fixture
def runner() -> StepRunner:
    return StepRunner()


@pytest.fixture
def client(tmp_path, runner):
    with client_for(make_settings(tmp_path), runner) as c:
        yield c


def deliver(client, payload, delivery):
    body = json.dumps(payload).encode()
    ts = str(int(time.time()))
    return client.post(
        "/webhook",
        content=body,
        headers={
            "X-MLflow-Delivery-Id": delivery,
            "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": sign(SECRET, delivery, ts, body),
            "Content-Type": "application/json",
        },
    )


def created(version, name="Iris Classifier"):
    return {
        "entity": "model_version",
        "action": "created",
        "data": {"name": name, "version": version},
    }


def aliased(version, alias, name="Iris Classifier"):
    return {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": name, "version": version, "alias": alias},
    }


def finished(client, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/builds/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def row_html(page: str, job_id: str) -> str:
    start = page.index(f'data-job-id="{job_id}"')
    end = page.find('<tr class="job"', start)
    return page[start : end if end != -1 else len(page)]


def test_board_shows_a_build_with_digest_steps_and_mlflow_link(client):
    job_id = deliver(client, created("1"), "d-1").json()["job_id"]
    finished(client, job_id)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    row = row_html(page.text, job_id)
    assert 'data-state="succeeded"' in row
    assert f"127.0.0.1:5000/models/m@{DIGEST}" in row
    for step in ("resolve", "build", "smoke", "push"):
        assert f'data-step="{step}"' in row
    assert "http://mlflow.example:5000/#/models/Iris%20Classifier/versions/1" in row
    # Readable without JavaScript: the script only adds buttons, the data is all in the HTML.
    assert '<script src="/static/board.js" defer></script>' in page.text
    assert 'rel="icon"' in page.text  # no favicon request, so no 404 in the console


def test_failed_build_shows_the_step_and_reason_in_plain_words(client, runner):
    runner.failing["7"] = PermanentError("model version 7 of 'Iris Classifier' does not exist")
    job_id = deliver(client, created("7"), "d-7").json()["job_id"]
    assert finished(client, job_id)["state"] == "failed"
    detail = client.get("/").text[client.get("/").text.index(f'data-for="{job_id}"') :]
    assert "Failed while resolving and downloading the model (attempt 1)" in detail
    assert "does not exist" in detail
    assert "resolving Iris Classifier 7" in detail  # the log tail


def test_filters_by_model_and_state(client, runner):
    runner.failing["2"] = PermanentError("broken")
    ok = deliver(client, created("1"), "d-1").json()["job_id"]
    bad = deliver(client, created("2"), "d-2").json()["job_id"]
    other = deliver(client, created("1", name="Other"), "d-3").json()["job_id"]
    for job_id in (ok, bad, other):
        finished(client, job_id)
    failed_only = client.get("/", params={"state": "failed"}).text
    assert bad in failed_only and ok not in failed_only and other not in failed_only
    by_model = client.get("/", params={"model": "Other"}).text
    assert other in by_model and ok not in by_model
    # An unknown state is ignored rather than an error page.
    assert client.get("/", params={"state": "bogus"}).status_code == 200


def test_model_page_shows_where_each_alias_points(client):
    build = deliver(client, created("3"), "d-1").json()["job_id"]
    alias = deliver(client, aliased("3", "champion"), "d-2").json()["job_id"]
    finished(client, build)
    finished(client, alias)
    page = client.get("/models/Iris Classifier").text
    match = re.search(r'<tr class="alias" data-alias="champion" data-version="(\d+)"', page)
    assert match and match.group(1) == "3"
    assert f"127.0.0.1:5000/models/m@{DIGEST}" in page


def test_partial_rows_are_a_fragment_for_the_script(client):
    deliver(client, created("1"), "d-1")
    fragment = client.get("/", params={"partial": "1"}).text
    assert "<html" not in fragment and 'class="jobs"' in fragment


def test_script_is_served(client):
    response = client.get("/static/board.js")
    assert response.status_code == 200 and "addCopyButtons" in response.text
    assert response.headers["content-type"].startswith("text/javascript")


def test_read_token_guards_the_board_and_the_sign_in_form_sets_the_cookie(tmp_path, runner):
    settings = make_settings(tmp_path, api_token=TOKEN)
    # Over HTTPS: the cookie is Secure, so a client sends it back only there.
    with client_for(settings, runner, base_url="https://testserver") as client:
        locked = client.get("/models/x?y=1", follow_redirects=False)
        assert locked.status_code == 303
        assert locked.headers["location"] == "/signin?next=%2Fmodels%2Fx%3Fy%3D1"
        form = client.get(locked.headers["location"])
        assert form.status_code == 200 and 'action="/signin"' in form.text
        assert 'value="/models/x?y=1"' in form.text
        assert client.get("/", params={"partial": "1"}).status_code == 401
        wrong = client.post("/signin", data={"token": "nope", "next": "/"}, follow_redirects=False)
        assert wrong.status_code == 401 and "not right" in wrong.text
        assert "mlflow_dock_token" not in wrong.headers.get("set-cookie", "")
        ok = client.post(
            "/signin", data={"token": TOKEN, "next": "//evil.example/"}, follow_redirects=False
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/"  # no open redirect
        cookie = ok.headers["set-cookie"]
        assert "mlflow_dock_token=" in cookie and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower() and "secure" in cookie.lower()
        board = client.get("/")
        assert board.status_code == 200  # the cookie jar now holds the token
        assert 'action="/signout"' in board.text
        assert client.get("/metrics").status_code == 200
        out = client.post("/signout", follow_redirects=False)
        assert out.status_code == 303 and 'mlflow_dock_token=""' in out.headers["set-cookie"]
        client.cookies.clear()
        assert client.get("/metrics").status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/metrics", headers=bearer).status_code == 200


def _signin_cookie(settings: Settings, runner: StepRunner) -> str:
    # Plain HTTP, as behind a TLS-terminating proxy: the request's scheme must not decide.
    with client_for(settings, runner) as client:
        ok = client.post("/signin", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
        assert ok.status_code == 303
        return ok.headers["set-cookie"].lower()


def test_sign_in_cookie_is_secure_unless_the_operator_turns_it_off(tmp_path, runner):
    assert "secure" in _signin_cookie(make_settings(tmp_path, api_token=TOKEN), runner)
    plain = make_settings(tmp_path, api_token=TOKEN, cookie_secure=False)
    assert "secure" not in _signin_cookie(plain, runner)


def test_sign_in_cookie_is_secure_whenever_the_service_serves_tls(tmp_path, runner):
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    settings = make_settings(
        tmp_path,
        api_token=TOKEN,
        cookie_secure=False,
        tls_cert_file=tmp_path / "cert.pem",
        tls_key_file=tmp_path / "key.pem",
    )
    assert "secure" in _signin_cookie(settings, runner)


def test_credentials_in_the_tracking_uri_never_reach_the_board(tmp_path, runner):
    settings = make_settings(
        tmp_path, mlflow_tracking_uri="https://alice:s3cret-token@mlflow.example/ml?token=q1w2e3"
    )
    with client_for(settings, runner) as client:
        finished(client, deliver(client, created("1", name="m"), "d-cred").json()["job_id"])
        page = client.get("/").text
    assert 'href="https://mlflow.example/ml/#/models/m/versions/1"' in page
    assert "s3cret-token" not in page and "alice" not in page and "q1w2e3" not in page


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://user:pass@mlflow:5000/base?token=x#y", "https://mlflow:5000/base"),
        ("http://mlflow:5000/", "http://mlflow:5000"),
        ("https://dbc.example/ml", "https://dbc.example/ml"),
        ("databricks", None),
        ("file:///tmp/mlruns", None),
        (None, None),
    ],
)
def test_mlflow_links_only_for_http_tracking_servers(uri, expected):
    assert mlflow_ui_base(uri) == expected


def test_version_link_quotes_the_model_name():
    assert version_link("http://m", "a/b c", "4") == "http://m/#/models/a%2Fb%20c/versions/4"


def test_board_and_api_show_the_sbom_and_signature_of_an_image(tmp_path):
    sbom = "127.0.0.1:5000/models/m@sha256:" + "5" * 64
    signature = "127.0.0.1:5000/models/m@sha256:" + "6" * 64

    class SigningRunner(StepRunner):
        def run(self, job, log):
            outcome = super().run(job, log)
            return JobOutcome(
                image=outcome.image,
                digest=outcome.digest,
                tags=outcome.tags,
                sbom=sbom,
                signature=signature,
            )

    with client_for(make_settings(tmp_path), SigningRunner()) as c:
        job_id = deliver(c, created("1"), "d-signed").json()["job_id"]
        job = finished(c, job_id)
        assert (job["sbom"], job["signature"], job["provenance"]) == (sbom, signature, None)
        row = row_html(c.get("/").text, job_id)
        assert f'title="CycloneDX: {sbom}"' in row
        assert f'title="cosign signature: {signature}"' in row
        assert "provenance" not in row
        # One copy target per row: the image's pinned reference.
        assert row.count("data-copy=") == 1


def test_board_and_api_show_both_protocols_and_the_modelcar(tmp_path):
    car = "127.0.0.1:5000/models/m@sha256:" + "7" * 64

    class ServingRunner(StepRunner):
        def run(self, job, log):
            outcome = super().run(job, log)
            return JobOutcome(
                image=outcome.image,
                digest=outcome.digest,
                tags=outcome.tags,
                modelcar=car,
                v2_model="fraud model",
            )

    with client_for(make_settings(tmp_path), ServingRunner()) as c:
        job_id = deliver(c, created("1"), "d-v2").json()["job_id"]
        job = finished(c, job_id)
        assert (job["modelcar"], job["v2_model"]) == (car, "fraud model")
        row = row_html(c.get("/").text, job_id)
        assert "POST /invocations" in row
        assert "POST /v2/models/fraud%20model/versions/1/infer" in row
        assert f'data-copy="oci://{car}"' in row


def test_an_image_speaking_only_mlflows_protocol_shows_no_v2_endpoint(tmp_path):
    with client_for(make_settings(tmp_path), StepRunner()) as c:
        job_id = deliver(c, created("1"), "d-mlflow").json()["job_id"]
        job = finished(c, job_id)
        assert (job["modelcar"], job["v2_model"]) == (None, None)
        row = row_html(c.get("/").text, job_id)
        assert "POST /invocations" in row and "/v2/" not in row and "Modelcar" not in row
