"""The build board: server-rendered HTML at `/` and `/models/{name}`, readable without JavaScript.

A small script (`/static/board.js`) adds copy buttons and swaps in fresh rows every few seconds
while the page is open; without it, a `<noscript>` meta refresh does the same job. Everything is
behind the read token when one is set: browsers send it as a cookie that `/signin` sets.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.templating import Jinja2Templates

from mlflow_dock.intake.auth import COOKIE_NAME, ReadAccess
from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.jobs.steps import STEP_FAILED, STEP_NAMES, STEP_RUNNING, StepTiming
from mlflow_dock.serving.layer import v2_infer_path

BOARD_LIMIT = 50
LOG_TAIL_LINES = 15
# Seconds between refreshes while the page is open (script and noscript alike).
REFRESH_SECONDS = 3


@dataclass(frozen=True)
class StepView:
    name: str
    seconds: float | None
    outcome: str
    running_for: float | None = None

    @property
    def label(self) -> str:
        if self.seconds is not None:
            return f"{self.name} {_duration(self.seconds)}"
        if self.outcome == STEP_RUNNING and self.running_for is not None:
            return f"{self.name} {_duration(self.running_for)} …"
        return self.name


@dataclass(frozen=True)
class Row:
    job: Job
    what: str  # "build", "alias champion -> 3", "alias champion removed"
    pinned: str | None
    steps: list[StepView]
    reason: str | None
    waiting: bool  # the reason is a wait, not a failure
    log_tail: list[str]
    mlflow_link: str | None
    age: str
    duration: str | None
    # (protocol, request) the image answers, once there is one: MLflow's always, V2 where the
    # image runs mlflow-dock's server.
    endpoints: list[tuple[str, str]] = field(default_factory=list)


def mlflow_ui_base(tracking_uri: str | None) -> str | None:
    """The MLflow UI's address if the tracking URI is an http(s) server, else None.

    Without credentials, query or fragment: a tracking URI may carry `user:token@` (or a token
    parameter), and every reader of the board would see it in the links.
    """
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    parsed = urlsplit(tracking_uri)
    host = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=host, query="", fragment="").geturl().rstrip("/")


def version_link(base: str | None, model: str, version: str) -> str | None:
    if base is None or not version:
        return None
    return f"{base}/#/models/{quote(model, safe='')}/versions/{quote(version, safe='')}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return ""
    return _duration(max(0.0, (now - when).total_seconds())) + " ago"


def _pinned(job: Job) -> str | None:
    if not job.image or not job.digest:
        return None
    name, sep, tag = job.image.rpartition(":")
    repository = name if sep and "/" not in tag else job.image
    return f"{repository}@{job.digest}"


def _endpoints(job: Job) -> list[tuple[str, str]]:
    if job.state is not JobState.SUCCEEDED or not job.digest or job.kind is JobKind.UNALIAS:
        return []
    found = [("MLflow", "POST /invocations")]
    if job.v2_model:
        found.append(("V2", f"POST {v2_infer_path(job.v2_model, job.version)}"))
    return found


def _what(job: Job) -> str:
    if job.kind is JobKind.ALIAS:
        return f"alias {job.alias} → version {job.version}"
    if job.kind is JobKind.UNALIAS:
        return f"alias {job.alias} removed"
    return "build"


def _reason(job: Job, steps: Sequence[StepView]) -> str | None:
    """The failure (or wait) in plain words: which step, then what the remote said."""
    if job.state is JobState.FAILED:
        failed = next((s.name for s in reversed(steps) if s.outcome == STEP_FAILED), None)
        where = f" while {STEP_NAMES.get(failed, failed)}" if failed else ""
        return f"Failed{where} (attempt {job.attempts}): {job.error or 'no reason recorded'}"
    if job.state is JobState.QUEUED and job.error:
        return f"Attempt {job.attempts} did not succeed; {job.error}"
    if job.state is JobState.QUEUED and job.depends_on:
        return f"Waits for the build of version {job.version}."
    return None


def _latest_attempt(timings: Sequence[StepTiming], now: datetime) -> list[StepView]:
    if not timings:
        return []
    last = max(t.attempt for t in timings)
    return [
        StepView(
            t.name,
            t.seconds,
            t.outcome,
            (now - t.started_at).total_seconds() if t.started_at is not None else None,
        )
        for t in timings
        if t.attempt == last
    ]


# Alias: inside BoardReads, `list` names its method, not the type.
_Jobs = list[Job]


class BoardReads(Protocol):
    """The job reads the board shows (`store.reads.JobReads`, `store.telemetry.Telemetry`)."""

    def list(
        self,
        *,
        model_name: str | None = ...,
        state: JobState | None = ...,
        limit: int = ...,
        offset: int = ...,
    ) -> _Jobs: ...

    def model_names(self) -> Sequence[str]: ...

    def latest_alias_ops(self) -> dict[tuple[str, str], Job]: ...

    def steps_for(self, job_ids: Collection[str]) -> Mapping[str, Sequence[StepTiming]]: ...


class _Board:
    """Reads what the pages show; runs in a worker thread (store and log files block)."""

    def __init__(self, request: Request, mlflow_base: str | None) -> None:
        service = request.app.state.service
        self._store: BoardReads = service.store
        self._logs = service.logs
        self._mlflow = mlflow_base

    def rows(self, jobs: Sequence[Job]) -> list[Row]:
        now = datetime.now(UTC)
        timings = self._store.steps_for([j.id for j in jobs])
        rows = []
        for job in jobs:
            steps = _latest_attempt(timings.get(job.id, []), now)
            rows.append(
                Row(
                    job=job,
                    what=_what(job),
                    pinned=_pinned(job),
                    steps=steps,
                    reason=_reason(job, steps),
                    waiting=job.state is not JobState.FAILED,
                    log_tail=self._logs.tail(job.id, LOG_TAIL_LINES),
                    mlflow_link=version_link(self._mlflow, job.model_name, job.version),
                    age=_ago(job.created_at, now),
                    duration=_duration(job.duration_seconds)
                    if job.duration_seconds is not None
                    else None,
                    endpoints=_endpoints(job),
                )
            )
        return rows

    def board(self, model: str | None, state: JobState | None) -> dict[str, Any]:
        jobs = self._store.list(model_name=model, state=state, limit=BOARD_LIMIT)
        return {
            "rows": self.rows(jobs),
            # The filtered model stays selectable before its first job exists.
            "models": sorted({*self._store.model_names(), *([model] if model else [])}),
            "model": model or "",
            "state": state.value if state else "",
            "states": [s.value for s in JobState],
            "active": any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in jobs),
        }

    def model(self, name: str) -> dict[str, Any]:
        jobs = self._store.list(model_name=name, limit=500)
        aliases = []
        for (model, alias), job in sorted(self._store.latest_alias_ops().items()):
            if model != name:
                continue
            if job.kind is JobKind.UNALIAS and job.state is JobState.SUCCEEDED:
                continue  # the alias was removed
            aliases.append(
                {
                    "alias": alias,
                    "job": job,
                    "pinned": _pinned(job),
                    "link": version_link(self._mlflow, name, job.version),
                }
            )
        builds = [j for j in jobs if j.kind is JobKind.BUILD]
        return {
            "name": name,
            "aliases": aliases,
            "rows": self.rows(builds[:BOARD_LIMIT]),
            "active": any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in jobs),
        }


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=PackageLoader("mlflow_dock.intake", "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["refresh_seconds"] = REFRESH_SECONDS
    env.globals["step_words"] = STEP_NAMES
    return Jinja2Templates(env=env)


def board_router(
    access: ReadAccess, *, mlflow_ui_url: str | None = None, secure_cookie: bool = True
) -> APIRouter:
    """The board's routes; `access` guards them as it guards the JSON read endpoints.

    `secure_cookie`: the sign-in cookie carries `Secure`. Decided by configuration, not by the
    request's scheme, which is http behind a TLS-terminating proxy.
    """
    router = APIRouter(include_in_schema=False)
    templates = _templates()
    mlflow_base = mlflow_ui_base(mlflow_ui_url)
    script = resources.files("mlflow_dock.intake").joinpath("templates", "board.js")

    def locked(request: Request, partial: bool) -> Response:
        if partial:
            # The script's poll: it reloads the page, which then shows the sign-in form.
            return Response("sign in first", status_code=401, media_type="text/plain")
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        # A redirect rather than a 401 page: browsers log every 4xx navigation as an error.
        return RedirectResponse(f"/signin?{urlencode({'next': here})}", status_code=303)

    @router.get("/signin", response_class=HTMLResponse)
    async def signin_form(request: Request, target: str = Query("/", alias="next")) -> Response:
        return templates.TemplateResponse(
            request, "signin.html", {"next": _safe_next(target), "failed": False}
        )

    @router.get("/", response_class=HTMLResponse)
    async def board(
        request: Request,
        model: str | None = Query(default=None),
        state: str | None = Query(default=None),
        partial: bool = Query(default=False),
    ) -> Response:
        if not access.allows(request):
            return locked(request, partial)
        wanted = JobState(state) if state in {s.value for s in JobState} else None
        data = await run_in_threadpool(_Board(request, mlflow_base).board, model or None, wanted)
        page = "_rows.html" if partial else "board.html"
        return templates.TemplateResponse(request, page, {**data, "partial": partial})

    @router.get("/models/{name:path}", response_class=HTMLResponse)
    async def model_page(request: Request, name: str, partial: bool = False) -> Response:
        if not access.allows(request):
            return locked(request, partial)
        data = await run_in_threadpool(_Board(request, mlflow_base).model, name)
        page = "_model.html" if partial else "model.html"
        return templates.TemplateResponse(request, page, {**data, "partial": partial})

    @router.post("/signin")
    async def do_signin(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = form.get("token", [""])[0].strip()
        target = _safe_next(form.get("next", ["/"])[0])
        if not access.enabled:
            return RedirectResponse(target, status_code=303)
        if not token or not access.accepts(token):
            return templates.TemplateResponse(
                request, "signin.html", {"next": target, "failed": True}, status_code=401
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            token,
            httponly=True,
            samesite="strict",
            secure=secure_cookie,
            path="/",
        )
        return response

    @router.post("/signout")
    async def signout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/")
        return response

    @router.get("/static/board.js")
    async def board_js() -> Response:
        # Public on purpose: the script holds nothing secret and the sign-in page uses none.
        return Response(
            script.read_text(encoding="utf-8"),
            media_type="text/javascript",
            headers={"Cache-Control": "no-cache"},
        )

    return router


def _safe_next(target: str) -> str:
    # Only paths on this site: an open redirect would let a link send a signed-in user anywhere.
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def filter_query(model: str, state: str) -> str:
    params = {k: v for k, v in (("model", model), ("state", state)) if v}
    return f"?{urlencode(params)}" if params else ""
