from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient

from mlflow_dock.app import Components, Service
from mlflow_dock.intake.api import create_app
from mlflow_dock.intake.signatures import sign
from mlflow_dock.settings import Settings

SECRET = "whsec-accept"


class _Runner:
    def run(self, job, log):  # pragma: no cover - builds never start in this test
        raise AssertionError("no build expected")


def test_write_back_tags_of_a_batch_are_recorded_before_the_answer(tmp_path):
    settings = Settings(
        _env_file=None,
        webhook_secret=SECRET,
        docker_username="dock",
        docker_registry_password="pw",
        docker_registry="127.0.0.1:5000",
        data_dir=tmp_path,
        mlflow_write_back=True,
        mlflow_tracking_uri="http://127.0.0.1:9",
        reconcile_interval_seconds=0,
        smoke_test=False,
        build_concurrency=0,
    )
    components = Components(settings)
    components.runner = _Runner()  # type: ignore[assignment]
    service = Service(components)
    with TestClient(create_app(lambda: service)) as client:
        for version in ("1", "2"):
            body = json.dumps(
                {
                    "entity": "model_version",
                    "action": "created",
                    "data": {"name": "Iris", "version": version},
                }
            ).encode()
            ts = str(int(time.time()))
            delivery = f"d-{version}"
            response = client.post(
                "/webhook",
                content=body,
                headers={
                    "X-MLflow-Delivery-Id": delivery,
                    "X-MLflow-Timestamp": ts,
                    "X-MLflow-Signature": sign(SECRET, delivery, ts, body),
                },
            )
            assert response.status_code == 202
            assert not response.json()["duplicate"]
        pending = {(w.version, w.tag, w.value) for w in service.store.pending_tag_writes()}
        assert pending == {
            ("1", "mlflow_dock.status", "queued"),
            ("2", "mlflow_dock.status", "queued"),
        }
