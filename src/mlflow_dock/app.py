"""The composition root: the one place that turns Settings into wired objects.

`build_service(settings)` is what `mlflow-dock serve`, the ASGI entry point, `build` and
`backfill` use; nothing else constructs stores, engines, runners or MLflow clients. The three
concerns stay apart so each can be replaced alone: the `Intake` (verify + parse + store) never
builds anything, the `JobStore` only records, and the `WorkerPool` only runs what it claims.
"""

from __future__ import annotations

import gc
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI

if TYPE_CHECKING:
    from celery import Celery

from mlflow_dock import __version__
from mlflow_dock.cloud.credentials import CredentialProvider
from mlflow_dock.cloud.ecr import EcrRepositories
from mlflow_dock.cloud.providers import RegistryAccess, layer_size_limit, registry_access
from mlflow_dock.errors import ConfigError, MlflowDockError
from mlflow_dock.imaging import ospackages
from mlflow_dock.imaging.builder import Builder
from mlflow_dock.imaging.derived import EngineDerivedBases, ExistingDerivedBases
from mlflow_dock.imaging.engine import DockerEngine, EngineTransfers
from mlflow_dock.imaging.layered import EngineRequired, LayeredBuilder
from mlflow_dock.imaging.layers import codec_named
from mlflow_dock.imaging.modelcar import (
    BusyboxModelcars,
    ImageCompanions,
    Modelcars,
    NoModelcars,
    busybox_from,
)
from mlflow_dock.imaging.modellayers import ModelLayerPolicy
from mlflow_dock.imaging.native import NativeBuilder, NativeConfig, native_runtime_key
from mlflow_dock.imaging.pipeline import Fallback, OncePerRuntime, Pipeline, Producer
from mlflow_dock.imaging.previous import AssembleOnEarlier, previous_version, remembered_runtime
from mlflow_dock.imaging.publisher import STAGING_REPOSITORY, Publisher
from mlflow_dock.imaging.registrycache import (
    CACHE_REPOSITORY,
    NoSharedLayers,
    RegistryLayerCache,
    SharedLayers,
)
from mlflow_dock.imaging.requirements import RequirementsPolicy
from mlflow_dock.imaging.runner import (
    AliasHandler,
    BuildConfig,
    BuildHandler,
    JobRunner,
    UnaliasHandler,
)
from mlflow_dock.imaging.smoke import SmokeLimits, SmokeTester
from mlflow_dock.imaging.smokepolicy import NoSmokeTest, SmokePolicy, SmokeTest
from mlflow_dock.imaging.stock import StockBuilder
from mlflow_dock.imaging.warm import WarmSmoke
from mlflow_dock.imaging.wheels import Platform
from mlflow_dock.intake.accept import Accepted, Intake
from mlflow_dock.intake.api import create_app
from mlflow_dock.intake.auth import ReadAccess
from mlflow_dock.intake.probes import Check, broker_check
from mlflow_dock.intake.signatures import WebhookVerifier
from mlflow_dock.jobs.checkpoint import Checkpointer
from mlflow_dock.jobs.distributed import Dispatcher, Sweeper, create_celery
from mlflow_dock.jobs.lanes import LanePlan, Lanes, plan_lanes
from mlflow_dock.jobs.locks import LeaderLease, StoreLocks
from mlflow_dock.jobs.logs import BuildLogs, JobLogs, Redactor, StoredBuildLogs
from mlflow_dock.jobs.model import Job, JobKind, Lane
from mlflow_dock.jobs.reconcile import ReconcileLoop, Reconciler
from mlflow_dock.jobs.steps import current as current_step_recorder
from mlflow_dock.jobs.steps import enter_step
from mlflow_dock.jobs.worker import WorkerPool, execute_job, worker_identity
from mlflow_dock.mlflow.client import MlflowSource
from mlflow_dock.mlflow.sources import AllowedSources
from mlflow_dock.mlflow.writeback import MlflowWriteBack, tag_writes_for
from mlflow_dock.observe.metrics import ServiceMetrics
from mlflow_dock.oci.reference import ImageRef, default_namespace
from mlflow_dock.oci.remote import RegistryClient
from mlflow_dock.settings import Settings
from mlflow_dock.store.facade import JobStore
from mlflow_dock.store.layercache import StoredLayerCache
from mlflow_dock.supply.attach import SupplyChain
from mlflow_dock.supply.signing import Signer, load_signer

__all__ = ["Components", "Service", "build_service", "create_asgi_app"]

logger = logging.getLogger(__name__)


def _mlflow_client_defaults() -> None:
    # MLflow's client retries each request up to 7 times with growing backoff (minutes in
    # total); our jobs already retry with their own backoff, so keep MLflow's layer short.
    # setdefault: an operator's explicit value still wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


class Components:
    """Everything built from one Settings, each part created once and on first use.

    Lazy so that `backfill` without `--wait` never touches the Docker Engine, and so that a
    configuration problem surfaces as a ConfigError from the first access, at the edge.
    """

    def __init__(self, settings: Settings) -> None:
        _mlflow_client_defaults()
        self.settings = settings

    @cached_property
    def store(self) -> JobStore:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        return JobStore.from_url(self.settings.resolved_database_url)

    @cached_property
    def redactor(self) -> Redactor:
        """Configured secrets plus the registry tokens cloud providers fetch while running."""
        return Redactor(self.settings.secret_values())

    @cached_property
    def metrics(self) -> ServiceMetrics:
        return ServiceMetrics()

    @cached_property
    def logs(self) -> JobLogs:
        if self.settings.executor == "celery":
            # Workers elsewhere: the store is the one place every replica can read them from.
            return StoredBuildLogs(self.store, secrets=self.redactor)
        return BuildLogs(self.settings.data_dir / "logs", secrets=self.redactor)

    @cached_property
    def source(self) -> MlflowSource:
        uri = self.settings.mlflow_tracking_uri
        allowed = AllowedSources(uri, self.settings.allowed_source_list)
        return MlflowSource(
            uri,
            allowed_sources=allowed,
            artifacts_destination=self.settings.artifacts_destination,
        )

    @cached_property
    def engine(self) -> DockerEngine:
        s = self.settings
        return DockerEngine(
            base_url=s.docker_host,
            network_mode=s.build_network,
            tls_verify=s.docker_tls_verify,
            cert_path=s.docker_cert_path,
        )

    @cached_property
    def registry_access(self) -> RegistryAccess:
        """Credentials for the registry (static, ECR or Google), and ECR's own API where the
        registry is ECR; chosen once here. Raises ConfigError."""
        password = self.settings.docker_registry_password
        return registry_access(
            registry=self.settings.docker_registry,
            username=self.settings.docker_username,
            password=password.get_secret_value() if password is not None else None,
            ecr_endpoint_url=self.settings.ecr_endpoint_url,
            ecr_create_repositories=self.settings.ecr_create_repositories,
            on_token=self.redactor.learn,
        )

    @cached_property
    def credentials(self) -> CredentialProvider:
        """The registry credential provider (static, ECR or Google); raises ConfigError."""
        return self.registry_access.credentials

    @cached_property
    def ecr(self) -> EcrRepositories | None:
        """ECR's own API where the registry is ECR: tag deletion, and repository creation."""
        return self.registry_access.ecr

    @cached_property
    def transfers(self) -> EngineTransfers:
        """The engine's pushes and pulls with the target registry's credentials."""
        return EngineTransfers(self.engine, self.credentials)

    @cached_property
    def warm(self) -> WarmSmoke:
        """Smoke tests of versions assembled on an already-tested runtime (about a second)."""
        return WarmSmoke(self.engine, limits=self.smoke_limits)

    @cached_property
    def smoke_tester(self) -> SmokeTester:
        return SmokeTester(self.engine, limits=self.smoke_limits)

    @cached_property
    def smoke_limits(self) -> SmokeLimits:
        """One set of limits for every container that runs model code (full and warm)."""
        s = self.settings
        return SmokeLimits(
            memory_bytes=s.smoke_memory_bytes,
            cpus=s.smoke_cpus,
            pids=s.smoke_pids,
            timeout_seconds=s.smoke_timeout_seconds,
        )

    @cached_property
    def smoke(self) -> SmokePolicy:
        if not self.settings.smoke_test:
            return NoSmokeTest()
        return SmokeTest(
            full=self.smoke_tester,
            warm=self.warm,
            engine=self.transfers,
            untested_without_engine=self.settings.builder == "native",
        )

    @cached_property
    def registry_tls(self) -> ssl.SSLContext:
        """One TLS context for every registry client of this process (each job makes clients;
        loading the CA bundle for each took ~160 ms of CPU, most of an alias job's time)."""
        return httpx.create_ssl_context()

    def registry(self, host: str) -> RegistryClient:
        # Credentials are fetched per client, i.e. per job: cloud tokens expire within hours.
        creds = self.credentials.get()
        # Made in the job's thread: its step recorder (if any) counts the blob transfers, also
        # those the client makes from helper threads.
        recorder = current_step_recorder()
        return RegistryClient(
            host,
            username=creds.username,
            password=creds.password,
            scheme="http" if self.settings.registry_insecure else None,
            on_blob=recorder.count_blob if recorder is not None else None,
            # Cloud tokens can be revoked or expire early: one fresh token on a 401, on every
            # registry path (the engine push has its own retry in the runner).
            refresh_credentials=self._fresh_credentials if self.credentials.refreshable else None,
            # ECR removes one tag with its own API; other registries with OCI's DELETE.
            delete_tag=self.ecr.delete_tag if self.ecr is not None else None,
            ssl_context=self.registry_tls,
        )

    def _fresh_credentials(self) -> tuple[str | None, str | None]:
        self.credentials.invalidate()
        fresh = self.credentials.get()
        return fresh.username, fresh.password

    @cached_property
    def build_config(self) -> BuildConfig:
        s = self.settings
        namespace = s.image_namespace
        if namespace is None:
            namespace = default_namespace(s.docker_registry, s.docker_username or "")
        index_url = s.pip_index_url
        return BuildConfig(
            work_dir=s.data_dir / "work",
            registry=s.docker_registry,
            namespace=namespace,
            base_image=s.base_image,
            pip_index_url=index_url.get_secret_value() if index_url else None,
            pip_extra_index_urls=s.pip_extra_index_url_list,
            ca_bundle=s.build_ca_bundle.read_bytes() if s.build_ca_bundle else None,
            requirements=RequirementsPolicy(
                allow_direct_references=s.allow_direct_references, allow_sdists=s.allow_sdists
            ),
        )

    def _pipeline(self, builder: Builder) -> Pipeline:
        return Pipeline(
            builder,
            smoke=self.smoke,
            publisher=self.publisher,
            attacher=self.supply,
            companions=self.companions,
        )

    @cached_property
    def model_layers(self) -> ModelLayerPolicy:
        """How models are cut into layers, and the registry's limit on one layer."""
        s = self.settings
        if s.max_layer_mib is None:
            limit = layer_size_limit(s.docker_registry)
        else:
            limit = (s.max_layer_mib << 20) or None  # 0: no limit
        return ModelLayerPolicy(
            file_layer_bytes=s.model_file_layer_mib << 20, max_layer_bytes=limit
        )

    @cached_property
    def modelcars(self) -> Modelcars:
        """KServe Modelcars on the operator's static busybox, or none (MLFLOW_DOCK_MODELCAR)."""
        if not self.settings.modelcar:
            return NoModelcars()
        # Packed once here: an unusable binary (dynamically linked, for another machine) is a
        # ConfigError at start, not at the first build.
        return BusyboxModelcars(
            busybox_from(self.settings.modelcar_busybox),
            cache=StoredLayerCache(self.store.database),
        )

    @cached_property
    def companions(self) -> ImageCompanions:
        """What follows each version's image: the V2 name it answers to, its Modelcar."""
        return ImageCompanions(registry_factory=self.registry, modelcars=self.modelcars)

    @cached_property
    def publisher(self) -> Publisher:
        return Publisher(
            registry_factory=self.registry,
            engine=self.transfers,
            staging=self.build_config.service_repository(STAGING_REPOSITORY),
            prepare_repository=self._prepare_repository,
        )

    @cached_property
    def producer(self) -> Producer:
        """The one place the builder strategies and their fallback order are decided.

        native (default): assemble on the model's previous version; else, once per runtime
        across workers, assemble on the image another build of the runtime published, or build
        it engine-free, falling back to the layered engine build where allowed and an engine
        answers. layered: the same with the engine in place of the native builder. mlflow:
        MLflow's stock Dockerfile, every version built whole.
        """
        s = self.settings
        if s.builder == "mlflow":
            return self._pipeline(
                StockBuilder(
                    self.engine, base_image=s.base_image, timeout_seconds=s.build_timeout_seconds
                )
            )
        layered = LayeredBuilder(self.engine, timeout_seconds=s.build_timeout_seconds)
        if s.builder == "native":
            new_runtime: Producer = self._pipeline(self.native)
            if s.engine_fallback:
                new_runtime = Fallback(
                    new_runtime, self._pipeline(EngineRequired(layered, self.transfers))
                )
        else:
            new_runtime = self._pipeline(layered)
        return Fallback(
            self._pipeline(
                AssembleOnEarlier(
                    previous_version(self.store),
                    registry_factory=self.registry,
                    model_layers=self.model_layers,
                )
            ),
            OncePerRuntime(
                assemble=self._pipeline(
                    AssembleOnEarlier(
                        remembered_runtime(self.store),
                        registry_factory=self.registry,
                        model_layers=self.model_layers,
                    )
                ),
                build=new_runtime,
                memory=self.store,
                locks=self.runtime_locks,
            ),
        )

    @cached_property
    def native(self) -> NativeBuilder:
        """The engine-free builder, its layer caches (own table, then the registry) and codec."""
        s = self.settings
        config = self.build_config
        derived = ExistingDerivedBases(
            config.service_repository(ospackages.DERIVED_REPOSITORY), memory=self.store
        )
        shared: SharedLayers = (
            RegistryLayerCache(
                config.service_repository(CACHE_REPOSITORY),
                prepare_repository=self._prepare_repository,
            )
            if s.registry_layer_cache
            else NoSharedLayers()
        )
        return NativeBuilder(
            NativeConfig(
                platforms=self._platforms,
                cache_dir=s.resolved_cache_dir,
                index_url=config.pip_index_url,
                extra_index_urls=config.pip_extra_index_urls,
                ca_bundle=config.ca_bundle,
                timeout_seconds=s.build_timeout_seconds,
                model_layers=self.model_layers,
                codec=codec_named(s.layer_compression),
            ),
            registry_factory=self.registry,
            # Its own table on the job store's database, through the store's one engine ...
            cache=StoredLayerCache(self.store.database),
            # ... and, for every worker on the registry, the registry itself.
            shared=shared,
            derived=(
                EngineDerivedBases(
                    derived.repository,
                    memory=self.store,
                    engine=self.transfers,
                    locks=self.runtime_locks,
                    prepare_repository=self._prepare_repository,
                    timeout_seconds=s.build_timeout_seconds,
                )
                if s.engine_fallback
                else derived
            ),
        )

    @property
    def _platforms(self) -> tuple[Platform, ...]:
        return tuple(Platform.parse(p) for p in self.settings.platforms.split(","))

    def _prepare_repository(self, repository: ImageRef) -> None:
        if self.settings.ecr_create_repositories and self.ecr is not None:
            self.ecr.ensure_repository(repository.path)

    @cached_property
    def signer(self) -> Signer | None:
        """The image signing key, or None (images get an SBOM but no signature)."""
        key, password = self.settings.signing_key, self.settings.signing_key_password
        if key is None:
            return None
        # An unreadable key or a wrong password is a one-line ConfigError at start.
        return load_signer(key, password.get_secret_value() if password is not None else None)

    @cached_property
    def supply(self) -> SupplyChain:
        return SupplyChain(
            registry_factory=self.registry,
            signer=self.signer,
            tool_version=__version__,
            cache_dir=self.settings.resolved_cache_dir / "layer-scans",
            resolve_base=self._base_image_digest,
            first_delivery=self.store.first_delivery,
        )

    def _base_image_digest(self, reference: str) -> str | None:
        # The engine knows the base it built on: its registry digest if it was pulled from one,
        # otherwise only its image id (a base built locally).
        image = self.engine.client.images.get(reference)
        repo_digests = image.attrs.get("RepoDigests") or []
        return str(repo_digests[0]) if repo_digests else str(image.id)

    @cached_property
    def runner(self) -> JobRunner:
        s = self.settings
        config = self.build_config
        platforms = self._platforms
        return JobRunner(
            build=BuildHandler(
                config=config,
                source=self.source,
                registry_factory=self.registry,
                producer=self.producer,
                builder_name=s.builder,
                attacher=self.supply,
                companions=self.companions,
                runtime_key_for=(
                    (lambda key: native_runtime_key(key, platforms))
                    if s.builder == "native"
                    else (lambda key: key)
                ),
                prepare_repository=self._prepare_repository,
                enter_step=enter_step,
                owners=self.store,
            ),
            alias=AliasHandler(
                config=config,
                builds=self.store,
                registry_factory=self.registry,
                enter_step=enter_step,
            ),
            unalias=UnaliasHandler(
                config=config,
                registry_factory=self.registry,
                enter_step=enter_step,
            ),
        )

    @cached_property
    def runtime_locks(self) -> StoreLocks:
        """One runtime build at a time per runtime key, across every worker on this store."""
        return StoreLocks(
            self.store, owner=worker_identity(), lease_seconds=self.settings.lease_seconds
        )

    def lanes(
        self,
        *,
        on_change: Callable[[Job], None] = lambda _job: None,
        durable_tags: bool = False,
        builds: bool = True,
    ) -> Lanes:
        """This process's worker pools: a build lane (`builds`) and an alias lane, by settings.

        `durable_tags`: each outcome's MLflow tags are stored in the outcome's transaction.
        """
        s = self.settings

        def pool(plan: LanePlan, on_finished: Callable[[Job], None]) -> WorkerPool:
            return WorkerPool(
                store=self.store,
                runner=self.runner,
                logs=self.logs,
                concurrency=plan.concurrency,
                max_attempts=s.max_attempts,
                backoff_seconds=s.retry_backoff_seconds,
                max_backoff_seconds=s.max_backoff_seconds,
                lease_seconds=s.lease_seconds,
                poll_seconds=plan.poll_seconds,
                on_change=on_change,
                tag_writes=tag_writes_for if durable_tags else None,
                kinds=plan.kinds,
                name=plan.lane.value,
                on_finished=on_finished,
            )

        plans = plan_lanes(
            build_concurrency=s.build_concurrency if builds else 0,
            alias_concurrency=s.alias_concurrency,
        )
        return Lanes(plans, pool)

    def reconciler(self) -> Reconciler:
        return Reconciler(self.source, self.store)

    def close(self) -> None:
        if "warm" in self.__dict__:
            self.warm.close()
        if "engine" in self.__dict__:
            self.engine.close()
        if "store" in self.__dict__:
            self.store.close()


class Service:
    """The running service: intake, embedded workers, reconciliation and MLflow write-back."""

    def __init__(self, components: Components) -> None:
        self.components = components
        settings = components.settings
        self.settings = settings
        self.store = components.store
        self.logs = components.logs
        # Wired eagerly: unusable registry credentials are a ConfigError at start, not at the
        # first build.
        components.runner  # noqa: B018
        # One leader per deployment runs the singletons: reconciliation, write-back, sweeping.
        self.leader = LeaderLease(
            self.store, owner=worker_identity(), lease_seconds=settings.lease_seconds
        )
        self.writeback = (
            MlflowWriteBack(components.source, self.store, is_leader=lambda: self.leader.is_leader)
            if settings.mlflow_write_back
            else None
        )
        self.intake = Intake(
            verifier=WebhookVerifier(
                settings.webhook_secrets, tolerance_seconds=settings.max_timestamp_age
            ),
            store=self.store,
            # The write-back's `queued` tags are committed with the batch's jobs.
            tag_writes=tag_writes_for if self.writeback is not None else None,
            on_queued=self._accepted,
        )
        # The build lane where this process builds; the alias lane in every `serve`, whatever
        # the executor (docs/scaling.md, "Lanes").
        self.lanes = components.lanes(
            on_change=self._job_changed,
            durable_tags=self.writeback is not None,
            builds=self._builds_here,
        )
        # MLFLOW_DOCK_EXECUTOR=celery: this process accepts and enqueues; workers build.
        self.dispatcher: Dispatcher | None = None
        self.sweeper: Sweeper | None = None
        if settings.executor == "celery" and settings.broker_url is not None:
            celery = create_celery(settings.broker_url.get_secret_value())
            self.dispatcher = Dispatcher(celery, self.store)
            self.sweeper = Sweeper(
                celery,
                self.store,
                interval_seconds=min(5.0, settings.lease_seconds / 3),
                resend_after_seconds=settings.redeliver_seconds,
                is_leader=lambda: self.leader.is_leader,
                job_log=self.logs.append,
                # Alias jobs run on the replicas' alias lanes, not through the broker (unless
                # this replica has none: then they go to the workers, as builds do).
                kinds=frozenset(JobKind) - self.lanes.kinds,
            )
        self._started = False
        # SQLite's checkpoints, off the intake's commits (see jobs/checkpoint.py).
        self.checkpointer = Checkpointer(self.store.checkpoint)
        self.reconcile: ReconcileLoop | None = None
        if settings.reconcile_interval_seconds > 0:
            self.reconcile = ReconcileLoop(
                components.reconciler(),
                interval=settings.reconcile_interval_seconds,
                is_leader=lambda: self.leader.is_leader,
                # Only versions registered since this store first started: pointing mlflow-dock
                # at an existing registry must not rebuild its whole history (`backfill` does).
                since=self.store.watch_since(),
                on_queued=self._reconciled,
            )

    def start(self) -> None:
        MlflowSource.import_client()
        self._started = True
        self.checkpointer.start()
        if self._builds_here:
            self._check_engine()
        self.leader.start()
        if self.writeback is not None:
            self.writeback.start()
        if self.dispatcher is not None and self.sweeper is not None:
            self.dispatcher.start()
            self.sweeper.start()
        self.lanes.start()
        if self.reconcile is not None:
            self.reconcile.start()
        # Everything loaded by now (MLflow, SQLAlchemy, FastAPI: ~200k objects) lives as long
        # as the process. Frozen, the cyclic collector stops scanning it; otherwise each full
        # collection stalls every request in flight for ~0.2 s (it was the intake's p99).
        gc.freeze()

    def _check_engine(self) -> None:
        try:
            self.components.engine.ping()
            if self.settings.smoke_test and (
                removed := self.components.smoke_tester.remove_leftovers()
            ):
                logger.warning("removed %d smoke-test container(s) left by a crash", removed)
        except MlflowDockError as exc:
            # Not fatal: the engine may come up later and jobs retry; but say so at once, since
            # a missing socket mount or group is otherwise only found at the first build.
            logger.warning("Docker Engine not reachable yet: %s", exc)

    def stop(self) -> None:
        if self.reconcile is not None:
            self.reconcile.stop()
        self.lanes.stop()
        if self.dispatcher is not None and self.sweeper is not None:
            self.sweeper.stop()
            self.dispatcher.stop()
        if self.writeback is not None:
            self.writeback.stop()
        self.leader.stop()
        self.checkpointer.stop()
        self.components.close()

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        return self.intake.accept(body, headers)

    async def accept_async(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        return await self.intake.accept_async(body, headers)

    def readiness_checks(self) -> dict[str, Check]:
        """What `/ready` checks: the store always, the broker and local workers if used."""
        checks: dict[str, Check] = {"store": self.store.ping}
        broker = self.settings.broker_url
        if self.settings.executor == "celery" and broker is not None:
            checks["broker"] = broker_check(broker.get_secret_value())
        if self._started:
            for lane, pool in self.lanes.pools.items():
                # "workers": the build lane's threads (the name /ready always had).
                name = "workers" if lane is Lane.BUILD else f"{lane.value}_workers"
                checks[name] = _threads_alive(pool)
        return checks

    @property
    def _builds_here(self) -> bool:
        # MLFLOW_DOCK_BUILD_CONCURRENCY=0: this process only accepts (an API replica).
        return self.settings.executor == "embedded" and self.settings.build_concurrency > 0

    def _job_changed(self, job: Job) -> None:
        if self.writeback is not None:
            self.writeback.job_changed(job)

    def _queued(self, job: Job) -> None:
        self._job_changed(job)
        self._announce(job)

    def _accepted(self, jobs: Sequence[Job]) -> None:
        """Jobs one intake batch queued (their write-back tags are already stored with them)."""
        for job in jobs:
            self._announce(job)

    def _announce(self, job: Job) -> None:
        """Wake the lane here that runs the job, or else send it to the Celery workers.

        With neither (an accept-only embedded replica), a process on the same store finds it.
        """
        if self.lanes.runs(job.kind):
            self.lanes.notify(job.kind)
        elif self.dispatcher is not None:
            self.dispatcher.submit(job.id)

    def _reconciled(self, job: Job) -> None:
        # A version or alias MLflow did not deliver (or we missed): worth a counter and alert.
        self.components.metrics.reconciled(job.kind.value)
        self._queued(job)


def _threads_alive(pool: WorkerPool) -> Check:
    return lambda: pool.running


class CeleryJobRunner:
    """The body of the celery task in `mlflow-dock worker`: claim the job id, run it, record.

    Components are created per process on first use, because the prefork pool forks after the
    app exists and database connections must not cross a fork.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pid: int | None = None
        self._components: Components | None = None
        self._owner = ""
        self._writeback: MlflowWriteBack | None = None

    def _ready(self) -> Components:
        if self._components is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._components = Components(self._settings)
            self._owner = worker_identity()
            if self._settings.mlflow_write_back:
                # Records tags in the store only; the leader replica writes them to MLflow.
                self._writeback = MlflowWriteBack(self._components.source, self._components.store)
        return self._components

    def __call__(self, job_id: str) -> None:
        components = self._ready()
        settings = self._settings
        job = None
        for delay in (0.5, 1, 2, 4, 8, 15, 30):
            try:
                job = components.store.claim(
                    job_id, owner=self._owner, lease_seconds=settings.lease_seconds
                )
                break
            except Exception as exc:
                # Store restarting: wait a little; past that the sweeper re-sends the job.
                logger.warning("claiming job %s failed, retrying in %s s: %s", job_id, delay, exc)
                time.sleep(delay)
        if job is None:
            return  # finished, running elsewhere, not runnable yet, or the store stayed down
        writeback = self._writeback
        execute_job(
            job,
            store=components.store,
            runner=components.runner,
            logs=components.logs,
            max_attempts=settings.max_attempts,
            backoff_seconds=settings.retry_backoff_seconds,
            max_backoff_seconds=settings.max_backoff_seconds,
            lease_seconds=settings.lease_seconds,
            on_change=writeback.job_changed if writeback is not None else lambda _job: None,
            tag_writes=tag_writes_for if writeback is not None else None,
        )


def create_celery_worker(settings: Settings) -> Celery:
    """The Celery app `mlflow-dock worker` runs: one task that runs a stored job by id."""
    if settings.broker_url is None:
        raise ConfigError("MLFLOW_DOCK_BROKER_URL: required for `mlflow-dock worker`")
    return create_celery(
        settings.broker_url.get_secret_value(),
        run_job=CeleryJobRunner(settings),
        concurrency=max(1, settings.build_concurrency),
        visibility_timeout_seconds=max(3600.0, 2.0 * settings.build_timeout_seconds),
    )


def build_service(settings: Settings) -> Service:
    """Wire the whole service from settings; raises ConfigError for unusable settings."""
    return Service(Components(settings))


def create_asgi_app(settings: Settings, *, service: Service | None = None) -> FastAPI:
    """The HTTP app for `serve` and ASGI servers; the service is wired in the lifespan.

    `serve` passes a service it already built, so wiring errors are one line on stderr.
    """
    token = settings.api_token.get_secret_value() if settings.api_token else None
    # The app's metrics registry belongs to the components the service is (or will be) made of.
    components = service.components if service is not None else Components(settings)
    return create_app(
        (lambda: service) if service is not None else (lambda: Service(components)),
        read_access=ReadAccess(token),
        metrics=components.metrics,
        mlflow_ui_url=settings.mlflow_tracking_uri,
        secure_cookie=settings.secure_cookie,
    )
