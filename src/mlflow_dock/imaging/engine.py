"""Docker Engine I/O through the docker SDK: build, run (smoke tests), push.

Engine and registry failures surface in the SDK's JSON streams or as SDK exceptions;
`classify_engine_error` is the one place that turns either into a retryable or permanent error.

The rule: a fault is transient unless something said no. An HTTP status (the engine's API
answer, or the registry's status in a push/pull stream's `errorDetail.code`) decides when there
is one; a registry transfer that broke without a refusal (connection reset, the engine's
`context deadline exceeded` while the registry hangs) is retried; a build step that failed is
deterministic and never retried. Message text is only ever used to recognise a refusal
(credentials, unknown names), never to make a failure retryable.
"""

from __future__ import annotations

import io
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from mlflow_dock.cloud.credentials import CredentialProvider, Credentials
from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.jobs.model import LogSink

_T = TypeVar("_T")

# Refusals in engine/registry messages that carry no status code. They win over everything but
# an explicit 5xx/429 status, because "denied" beside a vague error is still a credential problem.
_PERMANENT_PATTERNS = re.compile(
    r"unauthorized|authentication required|denied|forbidden|invalid username|"
    r"no basic auth credentials|manifest unknown|not found: manifest|pull access denied|"
    r"repository name must|invalid reference format|no matching distribution|"
    r"could not find a version|resolutionimpossible|dockerfile parse error|"
    r"unknown instruction|name unknown|blob upload invalid|tag invalid",
    re.IGNORECASE,
)


def _transient_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def classify_engine_error(
    message: str, *, what: str, status: int | None = None, transfer: bool = False
) -> Exception:
    """Retryable or permanent, from the status if there is one, else from what failed.

    `status`: an HTTP status the engine or registry answered. `transfer`: the failure is a
    push or pull talking to a registry, where anything short of a refusal is the network's (or
    the registry's) fault; otherwise it is a build step, which fails the same way every time.
    """
    line = " ".join(message.split())[:500]
    if status is not None and status >= 400:
        if _transient_status(status):
            return RetryableError(f"{what}: {line}")
        return PermanentError(f"{what}: {line}")
    if _PERMANENT_PATTERNS.search(line):
        return PermanentError(f"{what}: {line}")
    if transfer:
        return RetryableError(f"{what}: {line}")
    return PermanentError(f"{what}: {line}")


def _stream_error(chunk: dict[str, Any], what: str, *, transfer: bool) -> Exception:
    """The error of one JSON stream chunk; a push/pull's errorDetail code is the registry's."""
    detail = chunk.get("errorDetail")
    code = detail.get("code") if isinstance(detail, dict) else None
    # In a build stream the code is a RUN step's exit status, not an HTTP status.
    status = code if transfer and isinstance(code, int) and code >= 100 else None
    return classify_engine_error(str(chunk["error"]), what=what, status=status, transfer=transfer)


def _translate_sdk_error(exc: Exception, what: str, *, transfer: bool = False) -> Exception:
    import docker.errors
    import requests
    import urllib3.exceptions

    network = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
        OSError,
    )
    # First: APIError is a requests HTTPError, hence an OSError, but the engine did answer.
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code or 0
        explanation = str(exc.explanation or exc)
        # The engine answers 500 for a registry's refusal too (e.g. a pull without access).
        if _PERMANENT_PATTERNS.search(explanation):
            return PermanentError(f"{what}: {' '.join(explanation.split())[:500]}")
        if _transient_status(status):
            return RetryableError(f"{what}: Docker Engine error {status}: {explanation}")
        return classify_engine_error(
            explanation, what=what, status=status or None, transfer=transfer
        )
    if isinstance(exc, network):
        return RetryableError(f"{what}: cannot reach the Docker Engine: {exc}")
    if isinstance(exc, docker.errors.DockerException):
        return RetryableError(f"{what}: Docker Engine unavailable: {exc}")
    return classify_engine_error(f"{type(exc).__name__}: {exc}", what=what, transfer=transfer)


def engine_error(exc: Exception, what: str) -> Exception:
    """Retryable or permanent, for an SDK exception outside build, push and pull (e.g. a run)."""
    return _translate_sdk_error(exc, what)


def with_fresh_credentials(
    credentials: CredentialProvider, transfer: Callable[[Credentials], _T]
) -> _T:
    """Run an engine push or pull; when the registry refuses it, once more with a new token.

    A cloud token (ECR, Artifact Registry) can be revoked or expire before its stated end, and
    the engine only says "denied" or "unauthorized"; one fresh token is worth a try. A static
    password that was refused stays refused (the provider is not `refreshable`), so that is not
    retried. The registry API calls have the same rule in `RegistryClient(refresh_credentials=...)`.
    """
    try:
        return transfer(credentials.get())
    except PermanentError:
        if not credentials.refreshable:
            raise
        credentials.invalidate()
        return transfer(credentials.get())


class EngineTransfers:
    """The engine's pushes and pulls with the target registry's credentials, and its presence.

    Every transfer gets one fresh cloud token when refused (`with_fresh_credentials`).
    """

    def __init__(self, engine: DockerEngine, credentials: CredentialProvider) -> None:
        self.engine = engine
        self._credentials = credentials

    def reachable(self) -> bool:
        """Does an engine (Docker or Podman) answer? The engine-free path asks before using one."""
        try:
            self.engine.ping()
        except Exception:  # whatever the failure, there is no engine to use here
            return False
        return True

    def pull(self, repository: str, reference: str) -> None:
        with_fresh_credentials(
            self._credentials,
            lambda c: self.engine.pull(
                repository, reference, username=c.username, password=c.password
            ),
        )

    def push(self, repository: str, tag: str, log: LogSink) -> PushResult:
        return with_fresh_credentials(
            self._credentials,
            lambda c: self.engine.push(
                repository, tag, username=c.username, password=c.password, log=log
            ),
        )


_PROGRESS_STATUSES = frozenset({"Preparing", "Waiting", "Pushing"})


@dataclass(frozen=True)
class PushResult:
    reference: str
    digest: str
    note: str | None = None  # the tag named an image already and was kept (not pushed)


class DockerEngine:
    def __init__(
        self,
        *,
        base_url: str | None = None,
        network_mode: str | None = None,
        tls_verify: str | None = None,
        cert_path: str | None = None,
    ) -> None:
        # DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH as the docker SDK reads them,
        # handed in from the settings rather than read from this process's environment.
        self._environment = {
            name: value
            for name, value in (
                ("DOCKER_HOST", base_url),
                ("DOCKER_TLS_VERIFY", tls_verify),
                ("DOCKER_CERT_PATH", cert_path),
            )
            if value is not None
        }
        self._network_mode = network_mode
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.DockerClient(version="auto", **self.connection())
            except Exception as exc:
                raise _translate_sdk_error(exc, "connecting to the Docker Engine") from exc
        return self._client

    def connection(self) -> dict[str, Any]:
        """The SDK's connection arguments: base URL and, for a TLS daemon, its TLS config."""
        import docker

        return dict(docker.utils.kwargs_from_env(environment=self._environment))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def ping(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            raise _translate_sdk_error(exc, "pinging the Docker Engine") from exc

    def build(
        self,
        context_dir: Path,
        *,
        extra_files: dict[str, bytes],
        tag: str,
        labels: dict[str, str],
        log: LogSink,
        timeout: int,
    ) -> str:
        """Build `context_dir` (with its Dockerfile) and return the image id."""
        what = f"building {tag}"
        image_id = None
        # An unnamed temporary file: the context may hold a pip.conf with index credentials,
        # which must never be left on disk under a name.
        with _context_tar(context_dir, extra_files) as fileobj:
            try:
                stream = self.client.api.build(
                    fileobj=fileobj,
                    custom_context=True,
                    tag=tag,
                    labels=labels,
                    rm=True,
                    forcerm=True,
                    pull=False,
                    decode=True,
                    timeout=timeout,
                    network_mode=self._network_mode,
                )
                for chunk in stream:
                    if "stream" in chunk:
                        text = str(chunk["stream"]).rstrip("\n")
                        if text:
                            log(text)
                    if "aux" in chunk and isinstance(chunk["aux"], dict):
                        image_id = chunk["aux"].get("ID", image_id)
                    if "error" in chunk:
                        log(f"ERROR: {chunk['error']}")
                        raise _stream_error(chunk, what, transfer=False)
            except (PermanentError, RetryableError):
                raise
            except Exception as exc:
                raise _translate_sdk_error(exc, what) from exc
        if image_id is None:
            try:
                image_id = self.client.images.get(tag).id
            except Exception as exc:
                raise _translate_sdk_error(exc, what) from exc
        return str(image_id)

    def push(
        self, repository: str, tag: str, *, username: str, password: str, log: LogSink
    ) -> PushResult:
        """Push with credentials passed per call; `docker login` would write them to disk."""
        what = f"pushing {repository}:{tag}"
        digest = None
        for chunk in self._registry_stream(
            "push", repository, tag, username=username, password=password, log=log, what=what
        ):
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
            status = chunk.get("status")
            # Per-layer progress lines are noise in a job log; keep state changes only.
            if status and status not in _PROGRESS_STATUSES:
                log(f"{chunk.get('id', '')} {status}".strip())
        if digest is None:
            raise RetryableError(f"{what}: the engine reported no digest")
        return PushResult(reference=f"{repository}:{tag}", digest=digest)

    def pull(self, repository: str, reference: str, *, username: str, password: str) -> None:
        """Pull `repository@digest` or `repository:tag` with per-call credentials."""
        for _chunk in self._registry_stream(
            "pull",
            repository,
            reference,
            username=username,
            password=password,
            log=lambda _line: None,
            what=f"pulling {repository} {reference}",
        ):
            pass

    def _registry_stream(
        self,
        operation: str,
        repository: str,
        tag: str,
        *,
        username: str,
        password: str,
        log: LogSink,
        what: str,
    ) -> Iterator[dict[str, Any]]:
        """The engine's JSON progress stream of a push or pull, errors translated."""
        try:
            stream = getattr(self.client.api, operation)(
                repository,
                tag=tag,
                stream=True,
                decode=True,
                auth_config={"username": username, "password": password},
            )
            for chunk in stream:
                if "error" in chunk:
                    log(f"ERROR: {chunk['error']}")
                    raise _stream_error(chunk, what, transfer=True)
                yield chunk
        except (PermanentError, RetryableError):
            raise
        except Exception as exc:
            raise _translate_sdk_error(exc, what, transfer=True) from exc

    def tag(self, source: str, repository: str, tag: str) -> None:
        """Give the local image ``source`` one more name, ``repository:tag``."""
        try:
            self.client.images.get(source).tag(repository, tag)
        except Exception as exc:
            raise _translate_sdk_error(exc, f"tagging {source} as {repository}:{tag}") from exc

    def image_exists(self, reference: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(reference)
        except docker.errors.ImageNotFound:
            return False
        except Exception as exc:
            raise _translate_sdk_error(exc, f"inspecting {reference}") from exc
        return True


@contextmanager
def _context_tar(context_dir: Path, extra_files: dict[str, bytes]) -> Iterator[IO[bytes]]:
    """The build context as a tar in an unnamed temporary file.

    `extra_files` (pip.conf, CA bundle) go straight from memory into the tar: pip.conf may hold
    index credentials, and secrets are never written to disk under a name.
    """
    with tempfile.TemporaryFile() as fileobj:
        with tarfile.open(fileobj=fileobj, mode="w") as tar:
            for item in sorted(context_dir.iterdir()):
                tar.add(item, arcname=item.name, filter=_normalise)
            for name, data in sorted(extra_files.items()):
                info = _normalise(tarfile.TarInfo(name))
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        fileobj.seek(0)
        yield fileobj


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Fixed owners and times keep identical inputs byte-identical, which keeps the engine's
    # build cache and therefore the layer digests stable across versions.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info
