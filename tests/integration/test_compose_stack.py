"""compose.yaml, run for real: a registered model version becomes a pulled, serving image.

The stack is the repository's compose.yaml with a generated override that swaps in images
built here (see support.compose_stack: Debian's PostgreSQL, Redis and registry on the test
base, MLflow from deploy/compose/mlflow.Dockerfile, the service from the Dockerfile), because
nothing can be pulled on the test machines. Everything else is compose.yaml's own wiring:
MLflow on PostgreSQL delivering a real webhook to `serve`, Celery over Redis to the `worker`,
which builds engine-free (no Docker socket in any container) into the stack's registry. No
engine means no smoke test in the stack, so the build log says "published untested"; the test
then pulls the image and scores a prediction with it on the host's engine.

Measured on the shared 2-CPU machine (load 5-8): about 2 min 10 s with the stand-in images
cached (stack up ~35 s, version registered ~15 s, native build and push ~35 s, pull and serve
~10 s); building the three images from nothing takes about 2 min more (in parallel: service
image 125 s, MLflow 82 s, Debian stand-ins 38 s), and a change under src/ rebuilds the
service image's last layers (~20-40 s).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import docker.errors
import pytest

from mlflow import MlflowClient
from mlflow_dock.oci.remote import RegistryClient
from support.compose_stack import (
    BASE_REPOSITORY,
    BASE_TAG,
    ComposeStack,
    compose_command,
    ensure_standin_images,
)
from support.jobs import build_of, invoke, job_detail, wait_for_job
from support.servers import log_sklearn_model

pytestmark = pytest.mark.integration

SERVICE = "com.docker.compose.service"


@pytest.fixture
def stack(
    request: pytest.FixtureRequest,
    base_image: str,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> Iterator[ComposeStack]:
    command = compose_command()
    if command is None:
        pytest.fail("docker-compose is not installed (.ci/run installs it)", pytrace=False)
    started = time.monotonic()
    images = ensure_standin_images(base_image, tmp_path)
    print(f"stand-in images ready in {time.monotonic() - started:.1f}s: {images}")
    stack = ComposeStack(command, tmp_path, images)
    # The base goes into the stack's registry as soon as that answers, while `up` still
    # waits for PostgreSQL, MLflow and serve: it is needed only once a version is registered.
    pusher = ThreadPoolExecutor(max_workers=1)
    try:
        pushed = pusher.submit(_push_base, docker_client, base_image, stack)
        stack.up()
        stack.wait_until_answering()
        pushed.result(timeout=300)
        print(f"stack answering {time.monotonic() - started:.1f}s after the start")
        yield stack
    finally:
        failed = any(
            getattr(getattr(request.node, f"_report_{when}", None), "failed", False)
            for when in ("setup", "call")
        )
        if failed:
            print(f"----- compose logs (tail) -----\n{stack.logs(150)}")
        stack.down()
        # A push still waiting for a registry that never came up ends by its own timeout.
        pusher.shutdown(wait=False, cancel_futures=True)


def _push_base(docker_client: docker.DockerClient, base_image: str, stack: ComposeStack) -> None:
    """The test base into the stack's registry, where the native builder reads it."""
    stack.wait_for(f"http://{stack.registry_host}/v2/")
    repository = f"{stack.registry_host}/{BASE_REPOSITORY}"
    docker_client.images.get(base_image).tag(repository, BASE_TAG)
    try:
        for chunk in docker_client.api.push(repository, BASE_TAG, stream=True, decode=True):
            assert "error" not in chunk, chunk
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(f"{repository}:{BASE_TAG}", noprune=True)


def test_registered_version_becomes_a_pulled_serving_image(
    stack: ComposeStack, docker_client: docker.DockerClient
) -> None:
    started = time.monotonic()

    # As the README tells users: one webhook, to `serve` by its compose service name.
    mlflow = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    mlflow.create_webhook(
        name="mlflow-dock",
        url="http://serve:8000/webhook",
        secret=stack.webhook_secret,
        events=["model_version.created", "model_version_alias.created"],
    )
    time.sleep(1.2)  # the server's webhook cache (TTL 1 s in the stand-in override)

    model = f"Compose Iris {uuid.uuid4().hex[:8]}"
    version = log_sklearn_model(stack.mlflow_url, model)
    print(
        f"version {version} registered {time.monotonic() - started:.1f}s after the stack answered"
    )
    job = wait_for_job(stack, build_of(model, version), timeout=300)
    detail = job_detail(stack, job["id"])
    assert job["state"] == "succeeded", json.dumps(detail, indent=1)[-6000:]
    # Built without an engine: no container of the stack has a Docker socket.
    for container in stack.containers(docker_client):
        mounts = [m.get("Source", "") + m.get("Destination", "") for m in container.attrs["Mounts"]]
        assert not any("docker.sock" in mount for mount in mounts), (container.name, mounts)
    print(f"built and published {time.monotonic() - started:.1f}s after the stack answered")
    # The worker's build log, read from serve: in this mode it travels through the store.
    build_log = "\n".join(detail["log_tail"])
    assert "published untested" in build_log, build_log[-3000:]

    image = job["image"]
    assert image.startswith(f"{stack.registry_host}/"), image
    repository, _, tag = image.removeprefix(f"{stack.registry_host}/").rpartition(":")
    with RegistryClient(stack.registry_host) as registry:
        manifest = json.loads(registry.get_manifest(repository, tag).body)
    assert manifest["layers"], manifest

    try:
        docker_client.images.pull(image)
        response = invoke(docker_client, image)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == [0, 2]
        print(f"pulled and served {time.monotonic() - started:.1f}s after the stack answered")
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(image, force=True, noprune=True)
    # The stack's MLflow got the result back (write-back): the pushed digest, not just a tag.
    repository_ref = image.rpartition(":")[0]
    expected = {
        "mlflow_dock.status": "succeeded",
        "mlflow_dock.image": f"{repository_ref}@{job['digest']}",
    }
    deadline = time.monotonic() + 60
    while True:
        tags = mlflow.get_model_version(model, version).tags
        if expected.items() <= tags.items() or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert expected.items() <= tags.items(), tags
