"""HTTP API: `create_app(service_factory)` assembles routes, error mapping and the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from mlflow_dock.errors import (
    HeaderError,
    NotFoundError,
    PayloadError,
    PayloadTooLargeError,
    RequestError,
    SignatureError,
    TimestampError,
    UnauthorizedError,
    UnavailableError,
)
from mlflow_dock.intake.accept import Accepted as AcceptedDelivery
from mlflow_dock.intake.auth import ReadAccess
from mlflow_dock.intake.board import BoardReads, board_router
from mlflow_dock.intake.events import SUPPORTED_EVENTS
from mlflow_dock.intake.probes import Check, Readiness
from mlflow_dock.intake.receiver import MAX_BODY_BYTES, WebhookReceiver, handle
from mlflow_dock.jobs.logs import JobLogs
from mlflow_dock.jobs.model import Job, JobState
from mlflow_dock.observe.metrics import CONTENT_TYPE, FiguresSource, ServiceMetrics
from mlflow_dock.oci.reference import pinned

# The one table from our request errors to HTTP status codes.
STATUS_CODES: dict[type[RequestError], int] = {
    TimestampError: 400,
    HeaderError: 400,
    SignatureError: 401,
    UnauthorizedError: 401,
    NotFoundError: 404,
    PayloadTooLargeError: 413,
    PayloadError: 422,
    UnavailableError: 503,
}


def status_for(exc: RequestError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 400


class ReadStore(BoardReads, FiguresSource, Protocol):
    """The job reads the API, the board and `/metrics` make."""

    def get(self, job_id: str) -> Job: ...


class Service(Protocol):
    """What the HTTP layer needs from the running service (see `mlflow_dock.app.Service`)."""

    @property
    def store(self) -> ReadStore: ...

    logs: JobLogs

    def accept(self, body: bytes, headers: Mapping[str, str]) -> AcceptedDelivery: ...

    async def accept_async(self, body: bytes, headers: Mapping[str, str]) -> AcceptedDelivery: ...

    def readiness_checks(self) -> Mapping[str, Check]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class JobView(BaseModel):
    id: str
    kind: str
    state: JobState
    model_name: str
    version: str
    alias: str | None
    depends_on: str | None
    image: str | None
    digest: str | None
    image_with_digest: str | None
    tags: list[str]
    attempts: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    error: str | None
    # Supply-chain artifacts attached to the image (repository@digest of each), if any.
    sbom: str | None = None
    signature: str | None = None
    provenance: str | None = None
    # The version's KServe Modelcar (repository@digest) and, when the image speaks the Open
    # Inference Protocol, the model name V2 clients address it by.
    modelcar: str | None = None
    v2_model: str | None = None
    log_tail: list[str] | None = None


class Accepted(BaseModel):
    job_id: str
    state: JobState
    duplicate: bool
    status_url: str


class Health(BaseModel):
    status: str


def _view(job: Job, log_tail: list[str] | None = None) -> JobView:
    image_with_digest = pinned(job.image, job.digest) if job.image and job.digest else None
    return JobView(
        id=job.id,
        kind=job.kind.value,
        state=job.state,
        model_name=job.model_name,
        version=job.version,
        alias=job.alias,
        depends_on=job.depends_on,
        image=job.image,
        digest=job.digest,
        image_with_digest=image_with_digest,
        tags=list(job.tags),
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        duration_seconds=job.duration_seconds,
        error=job.error,
        sbom=job.sbom,
        signature=job.signature,
        provenance=job.provenance,
        modelcar=job.modelcar,
        v2_model=job.v2_model,
        log_tail=log_tail,
    )


async def _read_limited(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"body exceeds {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLargeError(f"body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    service_factory: Callable[[], Service],
    *,
    start_workers: bool = True,
    read_access: ReadAccess | None = None,
    metrics: ServiceMetrics | None = None,
    mlflow_ui_url: str | None = None,
    secure_cookie: bool = True,
) -> FastAPI:
    """The ASGI app; `service_factory` runs in the lifespan, so importing builds nothing.

    `metrics` is the app's own registry (a fresh one if not given); `mlflow_ui_url` is where
    the board links model versions to (MLFLOW_TRACKING_URI, when it is an http(s) URL, without
    its credentials); `secure_cookie`: the board's sign-in cookie is Secure.
    """
    access = read_access or ReadAccess(None)
    readers = [Depends(access)]
    app_metrics = metrics or ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service_factory()
        app.state.service = svc
        app_metrics.watch_store(svc.store)
        if start_workers:
            svc.start()
        try:
            yield
        finally:
            await run_in_threadpool(svc.stop)

    app = FastAPI(
        title="mlflow-dock",
        summary="MLflow Model Registry events -> serving images in your container registry",
        version="0.1.0",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc))

    def _service(request: Request) -> Service:
        return request.app.state.service  # type: ignore[no-any-return]

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="healthy")

    @app.get(
        "/ready",
        responses={
            200: {"description": "store, broker and workers usable"},
            503: {"description": "not ready; `not_ready` names the failing checks"},
        },
    )
    async def ready(request: Request) -> JSONResponse:
        """Readiness (Kubernetes readiness probe); `/health` is liveness only."""
        report = await Readiness(_service(request).readiness_checks()).report()
        return JSONResponse(report.body(), status_code=200 if report.ready else 503)

    @app.post(
        "/webhook",
        status_code=202,
        response_model=Accepted,
        responses={
            400: {"description": "timestamp or delivery id missing, malformed or too old"},
            401: {"description": "signature missing or wrong"},
            413: {"description": "body over 1 MiB"},
            422: {"description": f"unusable event; supported: {', '.join(SUPPORTED_EVENTS)}"},
        },
    )
    async def webhook(request: Request) -> Any:
        """Receive an MLflow webhook delivery (signature verified on the raw body first)."""
        # Normally answered by `WebhookReceiver` before routing (see intake/receiver.py); this
        # route documents the endpoint and gives the same answers if a request gets here.
        try:
            body = await _read_limited(request)
        except PayloadTooLargeError:
            app_metrics.webhook_delivery("413")
            raise
        status, answer = await handle(
            _service(request).accept_async,
            body,
            request.headers,
            status_for=status_for,
            count=app_metrics.webhook_delivery,
        )
        return JSONResponse(answer, status_code=status)

    @app.get("/builds", response_model=list[JobView], dependencies=readers)
    async def list_builds(
        request: Request,
        model: str | None = Query(default=None, description="exact MLflow model name"),
        state: JobState | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> list[JobView]:
        jobs = await run_in_threadpool(
            _service(request).store.list, model_name=model, state=state, limit=limit, offset=offset
        )
        return [_view(job) for job in jobs]

    @app.get("/builds/{job_id}", response_model=JobView, dependencies=readers)
    async def get_build(
        request: Request, job_id: str, log_lines: int = Query(default=50, ge=0, le=5000)
    ) -> JobView:
        svc = _service(request)
        job = await run_in_threadpool(svc.store.get, job_id)
        tail = await run_in_threadpool(svc.logs.tail, job.id, log_lines) if log_lines else []
        return _view(job, tail)

    @app.get(
        "/metrics",
        dependencies=readers,
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
    )
    async def metrics_endpoint() -> Response:
        """Prometheus metrics; job, queue and step figures are read from the job store."""
        body = await run_in_threadpool(app_metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    app.include_router(
        board_router(access, mlflow_ui_url=mlflow_ui_url, secure_cookie=secure_cookie)
    )
    app.add_middleware(
        WebhookReceiver,
        path="/webhook",
        accept=lambda: app.state.service.accept_async,
        status_for=status_for,
        count=app_metrics.webhook_delivery,
    )
    return app
