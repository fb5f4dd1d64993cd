from __future__ import annotations

import json

import pytest

from mlflow_dock.errors import PayloadError
from mlflow_dock.intake.events import AliasCreated, ModelVersionCreated, parse_event


def body(entity: str, action: str, data: object, **extra: object) -> bytes:
    return json.dumps({"entity": entity, "action": action, "data": data, **extra}).encode()


def test_model_version_created_as_sent_by_mlflow():
    event = parse_event(
        body(
            "model_version",
            "created",
            {
                "name": "Iris Classifier",
                "version": "2",
                "source": "models:/m-b62b",
                "run_id": None,
                "tags": {},
                "description": None,
            },
            timestamp="2026-11-26T14:16:12.929590+00:00",
            workspace="default",
        )
    )
    assert isinstance(event, ModelVersionCreated)
    assert (event.data.name, event.data.version, event.data.run_id) == (
        "Iris Classifier",
        "2",
        None,
    )


def test_alias_created():
    event = parse_event(
        body("model_version_alias", "created", {"name": "m", "alias": "champion", "version": "2"})
    )
    assert isinstance(event, AliasCreated)
    assert event.data.alias == "champion"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"{}", "missing field 'entity'"),
        (body("model_version", "created", {"version": "1"}), "missing field 'data.name'"),
        (body("model_version", "created", {"name": "m", "version": 1}), "data.version"),
        (body("model_version", "created", {"name": "m", "version": "abc"}), "data.version"),
        (body("model_version", "created", {"name": "", "version": "1"}), "data.name"),
        (body("model_version_alias", "created", {"name": "m", "version": "1"}), "data.alias"),
        (body("prompt", "created", {}), "supported events: model_version.created"),
        (body("model_version_tag", "set", {}), "unsupported event 'model_version_tag.set'"),
    ],
)
def test_bad_payloads_say_what_is_wrong(raw, message):
    with pytest.raises(PayloadError, match=message):
        parse_event(raw)


def test_alias_deleted_has_no_version():
    from mlflow_dock.intake.events import AliasDeleted

    event = parse_event(body("model_version_alias", "deleted", {"name": "m", "alias": "champion"}))
    assert isinstance(event, AliasDeleted) and event.data.alias == "champion"


@pytest.mark.parametrize("depth", [33, 900, 5000, 500_000])
def test_nesting_past_the_limit_is_a_payload_error_not_a_crash(depth):
    nested = b"[" * depth + b"]" * depth
    deep = b'{"entity":"model_version","action":"created","data":{"name":"m","version":"1","x":'
    for raw in (nested, deep + nested + b"}}"):
        with pytest.raises(PayloadError, match="more than 32 levels deep"):
            parse_event(raw)


def test_nesting_within_the_limit_is_parsed_as_before():
    inner = json.loads("[" * 29 + "]" * 29)
    event = parse_event(body("model_version", "created", {"name": "m", "version": "1", "x": inner}))
    assert isinstance(event, ModelVersionCreated)
    # Brackets inside strings count towards the cheap check only, never towards the depth.
    many = body("model_version", "created", {"name": "[" * 400, "version": "1"})
    assert isinstance(parse_event(many), ModelVersionCreated)
