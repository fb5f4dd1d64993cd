"""The running service: accepts events, stores jobs, and hands them to the workers.

The three concerns stay apart so each can be replaced alone: `accept` (verify + parse + store)
never builds anything, the `JobStore` only records, and the `WorkerPool` only runs what it
claims. Moving builds to a distributed task engine replaces the pool, nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mlflow_dock.build.engine import DockerEngine
from mlflow_dock.build.runner import JobRunner
from mlflow_dock.build.smoke import SmokeTester
from mlflow_dock.cloud.credentials import CredentialProvider
from mlflow_dock.errors import MlflowDockError
from mlflow_dock.intake.events import AliasCreated, AliasDeleted, ModelVersionCreated, parse_event
from mlflow_dock.intake.signatures import WebhookVerifier
from mlflow_dock.jobs.logs import BuildLogs
from mlflow_dock.jobs.model import Job
from mlflow_dock.jobs.reconcile import ReconcileLoop, Reconciler
from mlflow_dock.jobs.store import JobStore
from mlflow_dock.jobs.worker import WorkerPool
from mlflow_dock.mlflow.client import MlflowSource
from mlflow_dock.mlflow.writeback import MlflowWriteBack
from mlflow_dock.oci.remote import RegistryClient
from mlflow_dock.settings import Settings, registry_credentials

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    job: Job
    duplicate: bool


def make_registry_factory(
    settings: Settings, credentials: CredentialProvider
) -> Callable[[str], RegistryClient]:
    def factory(host: str) -> RegistryClient:
        # Credentials are fetched per client, i.e. per job: cloud tokens expire within hours.
        creds = credentials.get()
        return RegistryClient(
            host,
            username=creds.username,
            password=creds.password,
            scheme="http" if settings.registry_insecure else None,
        )

    return factory


def make_runner(
    settings: Settings,
    store: JobStore,
    engine: DockerEngine,
    credentials: CredentialProvider | None = None,
) -> JobRunner:
    """Wire a JobRunner from settings; raises ConfigError for unusable registry credentials."""
    credentials = credentials or registry_credentials(settings)
    smoke = (
        SmokeTester(engine, network_mode=settings.build_network) if settings.smoke_test else None
    )
    return JobRunner(
        settings=settings,
        store=store,
        source=MlflowSource(settings.mlflow_tracking_uri),
        engine=engine,
        credentials=credentials,
        registry_factory=make_registry_factory(settings, credentials),
        smoke=smoke,
    )


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        store: JobStore | None = None,
        runner: JobRunner | None = None,
    ) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or JobStore.from_url(settings.resolved_database_url)
        self.logs = BuildLogs(settings.data_dir / "logs", secrets=settings.secret_values())
        self.verifier = WebhookVerifier(
            settings.webhook_secrets, tolerance_seconds=settings.max_timestamp_age
        )
        self.engine = DockerEngine(
            base_url=settings.docker_host, network_mode=settings.build_network
        )
        self.runner = runner or make_runner(settings, self.store, self.engine)
        self.source = MlflowSource(settings.mlflow_tracking_uri)
        self.writeback = MlflowWriteBack(self.source) if settings.mlflow_write_back else None
        self.pool = WorkerPool(
            store=self.store,
            runner=self.runner,
            logs=self.logs,
            concurrency=settings.build_concurrency,
            max_attempts=settings.max_attempts,
            backoff_seconds=settings.retry_backoff_seconds,
            on_change=self._job_changed,
        )
        self.reconcile: ReconcileLoop | None = None
        if settings.reconcile_interval_seconds > 0:
            self.reconcile = ReconcileLoop(
                Reconciler(self.source, self.store),
                interval=settings.reconcile_interval_seconds,
                # Only versions registered since this store first started: pointing mlflow-dock
                # at an existing registry must not rebuild its whole history (`backfill` does).
                since=self.store.watch_since(),
                on_queued=self._queued,
            )

    def start(self) -> None:
        MlflowSource.import_client()
        try:
            self.engine.ping()
            if self.settings.smoke_test:
                smoke = SmokeTester(self.engine, network_mode=self.settings.build_network)
                if removed := smoke.remove_leftovers():
                    logger.warning("removed %d smoke-test container(s) left by a crash", removed)
        except MlflowDockError as exc:
            # Not fatal: the engine may come up later and jobs retry; but say so at once, since
            # a missing socket mount or group is otherwise only found at the first build.
            logger.warning("Docker Engine not reachable yet: %s", exc)
        if self.writeback is not None:
            self.writeback.start()
        self.pool.start()
        if self.reconcile is not None:
            self.reconcile.start()

    def stop(self) -> None:
        if self.reconcile is not None:
            self.reconcile.stop()
        self.pool.stop()
        if self.writeback is not None:
            self.writeback.stop()
        self.engine.close()
        self.store.close()

    def _job_changed(self, job: Job) -> None:
        if self.writeback is not None:
            self.writeback.job_changed(job)

    def _queued(self, job: Job) -> None:
        self._job_changed(job)
        self.pool.notify()

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        """Verify, de-duplicate, parse and store one delivery. Raises RequestError subclasses."""
        delivery_id = self.verifier.verify(body, headers)
        existing = self.store.job_for_delivery(delivery_id)
        if existing is not None:
            logger.info("delivery %s seen before: job %s", delivery_id, existing.id)
            return Accepted(existing, duplicate=True)
        event = parse_event(body)
        data = event.data
        if isinstance(event, ModelVersionCreated):
            job, changed = self.store.request_build(
                event.data.name, event.data.version, delivery_id=delivery_id
            )
        elif isinstance(event, AliasCreated):
            job, changed = self.store.request_alias(
                event.data.name, event.data.version, event.data.alias, delivery_id=delivery_id
            )
        else:
            assert isinstance(event, AliasDeleted)
            job, changed = self.store.request_unalias(
                event.data.name, event.data.alias, delivery_id=delivery_id
            )
        logger.info(
            "delivery %s: %s for '%s' -> %s job %s (%s)",
            delivery_id,
            event.kind,
            data.name,
            job.kind,
            job.id,
            "queued" if changed else f"existing, {job.state}",
        )
        if changed:
            self._queued(job)
        return Accepted(job, duplicate=not changed)
