from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from mlflow_dock.app import Components, Service
from mlflow_dock.errors import PayloadError
from mlflow_dock.intake.accept import quick_request
from mlflow_dock.intake.api import create_app
from mlflow_dock.intake.events import AliasCreated, AliasDeleted, ModelVersionCreated, parse_event
from mlflow_dock.intake.signatures import sign
from mlflow_dock.jobs.model import JobKind
from mlflow_dock.settings import Settings
from mlflow_dock.store.deliveries import DeliveryRequest

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


# -- the hand-written check of plainly valid payloads against the pydantic models ------------

_texts = st.one_of(
    st.sampled_from(["", "m", "Iris Classifier", "x" * 255, "x" * 256, "x" * 500, "x" * 501]),
    st.text(max_size=8),
    st.integers(),
    st.none(),
    st.lists(st.integers(), max_size=1),
)
_versions = st.one_of(
    st.sampled_from(["1", "12", "0", "01", "1\n", "1 ", "\u0661", "9" * 18, "9" * 19, "-1"]),
    st.integers(),
    st.none(),
)


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    keys = ("name", "version", "alias", "source", "run_id")
    data = {k: draw(_versions if k == "version" else _texts) for k in keys if draw(st.booleans())}
    envelope: dict[str, object] = {
        "entity": draw(st.sampled_from(["model_version", "model_version_alias", "prompt", ""])),
        "action": draw(st.sampled_from(["created", "deleted", "set"])),
        "data": data if draw(st.integers(0, 9)) else draw(_texts),
        "timestamp": "2026-11-27T04:00:00.000000+00:00",
    }
    for key in ("entity", "action", "data"):
        if not draw(st.integers(0, 9)):
            del envelope[key]
    return json.dumps(envelope).encode()


def _slow(body: bytes) -> DeliveryRequest | None:
    try:
        event = parse_event(body)
    except PayloadError:
        return None
    if isinstance(event, ModelVersionCreated):
        return DeliveryRequest("d", JobKind.BUILD, event.data.name, event.data.version)
    if isinstance(event, AliasCreated):
        d = event.data
        return DeliveryRequest("d", JobKind.ALIAS, d.name, d.version, d.alias)
    assert isinstance(event, AliasDeleted)
    return DeliveryRequest("d", JobKind.UNALIAS, event.data.name, "", event.data.alias)


@examples(max_examples=400, deadline=None)
@given(body=_payloads())
def test_the_quick_check_accepts_only_what_the_models_accept_with_the_same_result(body):
    quick = quick_request("d", body)
    assert quick is None or quick == _slow(body)


@pytest.mark.parametrize(
    "data",
    [
        {"name": "Iris", "version": "3", "source": "models:/m-1", "run_id": None, "tags": {}},
        {"name": "Iris", "version": "3", "alias": "champion"},
        {"name": "Iris", "alias": "champion"},
    ],
)
def test_what_mlflow_sends_takes_the_quick_path(data):
    entity = "model_version" if "alias" not in data else "model_version_alias"
    action = "deleted" if "version" not in data else "created"
    body = json.dumps({"entity": entity, "action": action, "data": data}).encode()
    assert quick_request("d", body) is not None
    assert quick_request("d", body) == _slow(body)
