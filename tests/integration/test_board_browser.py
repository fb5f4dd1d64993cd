"""The build board in a real headless Chromium while a real build goes through.

MLflow sends the webhooks (real server), the service builds with the real engine and pushes to
the real registry; the browser signs in with the read token and watches the page update by
itself. One service, one model, one real build: the failing job is a version MLflow does not
have, which fails at once without building.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlflow_dock.oci.remote import RegistryClient
from support import web
from support.jobs import BUILD_TIMEOUT, created_payload, signed_delivery
from support.servers import log_sklearn_model

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def artifacts_dir() -> Path:
    base = os.environ.get("CI_LOG_DIR")
    path = Path(base) / "board" if base else Path("/tmp/mlflow-dock-artifacts/board")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium package is not installed (bash .ci/run installs it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def row(page, **attributes: str):
    selector = "tr.job" + "".join(f'[data-{k}="{v}"]' for k, v in attributes.items())
    return page.locator(selector)


def wait_for_row(page, timeout: float, **attributes: str):
    """The row, once the page (updating itself, never reloaded here) shows it."""
    locator = row(page, **attributes)
    locator.first.wait_for(state="attached", timeout=timeout * 1000)
    return locator.first


def scrape(url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = web.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_board_follows_a_real_build_and_a_failure(
    service_factory, webhook_factory, mlflow_server, mlflow_client, registry, model_name, browser
):
    token = secrets.token_urlsafe(24)
    service = service_factory(
        MLFLOW_DOCK_BUILD_NETWORK="host",
        MLFLOW_DOCK_API_TOKEN=token,
        MLFLOW_DOCK_RECONCILE_INTERVAL="0",
    )
    webhook_factory(
        f"{service.url}/webhook",
        service_factory.secret,
        events=("model_version.created", "model_version_alias.created"),
    )
    shots = artifacts_dir()
    errors: list[str] = []
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.url)
    page = context.new_page()
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # Signed out, the board sends the browser to the sign-in form; the token sets a cookie.
    page.goto(f"{service.url}/?{urlencode({'model': model_name})}")
    assert "/signin" in page.url
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/signin" not in url and "model=" in url)
    assert page.locator("#live").count() == 1

    # A real version: MLflow's webhook queues the build; an alias waits for it, and a version
    # MLflow does not have queues behind it (one worker), to fail once its turn comes.
    version = log_sklearn_model(mlflow_server.url, model_name)
    mlflow_client.set_registered_model_alias(model_name, "champion", version)
    missing = "999"
    response = signed_delivery(
        service, service_factory.secret, created_payload(model_name, missing), str(uuid.uuid4())
    )
    assert response.status_code == 202

    wait_for_row(page, 120, kind="build", version=version, state="running")
    page.screenshot(path=str(shots / "1-running.png"), full_page=True)
    queued = row(page, kind="build", version=missing, state="queued")
    alias_waiting = row(page, kind="alias", alias="champion", state="queued")
    queued.first.wait_for(state="attached", timeout=30_000)
    alias_waiting.first.wait_for(state="attached", timeout=30_000)
    page.screenshot(path=str(shots / "2-queued.png"), full_page=True)

    done = wait_for_row(page, BUILD_TIMEOUT, kind="build", version=version, state="succeeded")
    page.screenshot(path=str(shots / "3-succeeded.png"), full_page=True)
    shown = done.locator("code.digest").inner_text().strip()
    job = next(
        j
        for j in web.get(
            f"{service.url}/builds",
            params={"model": model_name},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        if j["kind"] == "build" and j["version"] == version
    )
    repository, _, tag = job["image"].removeprefix(f"{registry.host}/").rpartition(":")
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        held = client.manifest_digest(repository, tag)
    assert held is not None and shown == f"{registry.host}/{repository}@{held}"
    steps = [s.get_attribute("data-step") for s in done.locator("li.step").all()]
    assert "resolve" in steps and "push" in steps and ("build" in steps or "assemble" in steps)
    link = done.locator(f'a[href*="#/models/{quote(model_name, safe="")}/versions/{version}"]')
    assert link.count() == 1 and link.get_attribute("href").startswith(mlflow_server.url)

    # The copy button is the script's; with clipboard permission the reference lands there.
    button = done.locator("button.copy")
    button.click()
    page.wait_for_function("b => b.textContent !== 'copy'", arg=button.element_handle())
    assert page.evaluate("navigator.clipboard.readText()") == shown

    failed = wait_for_row(page, 300, kind="build", version=missing, state="failed")
    detail = page.locator(f'tr.detail[data-for="{failed.get_attribute("data-job-id")}"]')
    reason = detail.locator(".reason").inner_text()
    assert reason.startswith("Failed while resolving and downloading the model"), reason
    assert model_name in reason and missing in reason
    page.screenshot(path=str(shots / "4-failed.png"), full_page=True)

    wait_for_row(page, 120, kind="alias", alias="champion", state="succeeded")
    page.goto(f"{service.url}/models/{quote(model_name)}")
    alias = page.locator('tr.alias[data-alias="champion"]')
    assert alias.get_attribute("data-version") == version
    assert alias.locator("code.digest").inner_text().strip() == shown
    page.screenshot(path=str(shots / "5-model.png"), full_page=True)

    # The same events, as Prometheus sees them.
    samples = scrape(service.url, token)
    assert metric(samples, "mlflow_dock_job_attempts_total", kind="build", outcome="succeeded") == 1
    assert metric(samples, "mlflow_dock_job_attempts_total", kind="build", outcome="failed") == 1
    assert metric(samples, "mlflow_dock_job_attempts_total", kind="alias", outcome="succeeded") == 1
    assert metric(samples, "mlflow_dock_step_duration_seconds_count", step="push") >= 1
    assert metric(samples, "mlflow_dock_step_duration_seconds_count", step="smoke") == 1
    assert metric(samples, "mlflow_dock_webhook_deliveries_total", outcome="202") >= 3
    assert metric(samples, "mlflow_dock_queue_depth", lane="build") == 0

    time.sleep(1)  # let a last poll land, so its console output (if any) is seen
    context.close()
    assert errors == [], errors
