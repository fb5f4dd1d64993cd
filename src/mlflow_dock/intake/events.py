"""The MLflow webhook events mlflow-dock acts on, parsed only after authentication."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from mlflow_dock.errors import PayloadError

# MLflow's payloads are three levels deep. Python's JSON decoder recurses once per level and
# raises RecursionError (not a ValueError) near 1000, which a 1 MiB body reaches easily.
MAX_JSON_DEPTH = 32

SUPPORTED_EVENTS = (
    "model_version.created",
    "model_version_alias.created",
    "model_version_alias.deleted",
)

_Name = Annotated[str, StringConstraints(min_length=1, max_length=500)]
_Version = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,17}$")]


class _Data(BaseModel):
    # Newer MLflow servers add keys (e.g. `workspace`); unknown keys must not break delivery.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ModelVersionData(_Data):
    name: _Name
    version: _Version
    source: str | None = None
    run_id: str | None = None


class AliasData(_Data):
    name: _Name
    alias: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    version: _Version


class AliasDeletedData(_Data):
    # MLflow's payload names no version: the alias is simply gone.
    name: _Name
    alias: Annotated[str, StringConstraints(min_length=1, max_length=255)]


class ModelVersionCreated(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["model_version.created"] = "model_version.created"
    data: ModelVersionData


class AliasCreated(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["model_version_alias.created"] = "model_version_alias.created"
    data: AliasData


class AliasDeleted(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["model_version_alias.deleted"] = "model_version_alias.deleted"
    data: AliasDeletedData


Event = ModelVersionCreated | AliasCreated | AliasDeleted


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    entity: str = Field(min_length=1)
    action: str = Field(min_length=1)
    data: dict[str, object]


def may_be_deep(body: bytes) -> bool:
    """Whether the body could nest deeper than MAX_JSON_DEPTH (cheap: bracket counts)."""
    return body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH


def load_json(body: bytes) -> object:
    """The JSON value of a body; PayloadError if it is not JSON or nests too deeply."""
    too_deep = f"body nests JSON more than {MAX_JSON_DEPTH} levels deep"
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise PayloadError(too_deep) from None
    if may_be_deep(body) and _depth(raw) > MAX_JSON_DEPTH:
        raise PayloadError(too_deep)
    return raw


def _depth(value: object) -> int:
    """Nesting depth of a decoded JSON value, without recursion; stops past the limit."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_event(body: bytes) -> Event:
    """Parse an authenticated body; PayloadError says precisely what is wrong."""
    raw = load_json(body)
    if not isinstance(raw, dict):
        raise PayloadError("body must be a JSON object")
    try:
        envelope = _Envelope.model_validate(raw)
    except ValidationError as exc:
        raise PayloadError(_first_error(exc)) from None
    event = f"{envelope.entity}.{envelope.action}"
    try:
        if event == "model_version.created":
            return ModelVersionCreated(data=ModelVersionData.model_validate(envelope.data))
        if event == "model_version_alias.created":
            return AliasCreated(data=AliasData.model_validate(envelope.data))
        if event == "model_version_alias.deleted":
            return AliasDeleted(data=AliasDeletedData.model_validate(envelope.data))
    except ValidationError as exc:
        raise PayloadError(_first_error(exc, prefix="data")) from None
    raise PayloadError(
        f"unsupported event '{event}'; supported events: {', '.join(SUPPORTED_EVENTS)}"
    )


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
    if error["type"] == "missing":
        return f"missing field '{loc}'"
    return f"invalid field '{loc}': {error['msg']}"
