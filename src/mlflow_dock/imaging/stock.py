"""MLflow's stock serving image (`MLFLOW_DOCK_BUILDER=mlflow`): compatibility over speed.

The build context is what `mlflow models generate-dockerfile --env-manager local` writes: MLflow's
own generator (`PyFuncBackend.generate_dockerfile` -> `docker_utils.generate_dockerfile`) renders
the Dockerfile and copies the model, so the image is the one MLflow documents: full `mlflow`,
nginx in front of uvicorn on 8080, `C._serve('local')` as the entrypoint. mlflow-dock then
makes a few small, marked insertions into that text, for what the stock image cannot do:

- a configured MLFLOW_DOCK_BASE_IMAGE replaces the `FROM python:<full version>-slim` line
  (machines that cannot pull from Docker Hub), followed by a shim that puts a venv of the base's
  `python3` first on PATH, because stock runs bare `python` and `pip` and calls `uvicorn` from
  PATH, while bases such as Debian's `python3` package provide none of them;
- pip's index URLs and CA bundle never enter the published stage. When any is configured, a
  first stage (``mlflow-dock-wheels``, never pushed) gets them from the engine's in-memory build
  context and only *downloads* what stock's pip runs will install (``pip wheel --only-binary
  :all:``: no package code runs there); stock's own stage then installs exactly as stock does,
  but offline from that wheelhouse (``PIP_CONFIG_FILE`` with ``no-index``), so neither the
  credentials nor the CA bundle is in any layer or in the history. Without them, stock's stage
  reads a pip.conf holding only pip's quiet options;
- nginx's log and temp directories are writable by any user, so the image also runs as a
  non-root user (the smoke test runs every image as 10001, on a read-only root with tmpfs
  mounts there, which keep the directories' mode; also Kubernetes' ``runAsNonRoot``);
- the entrypoint honours `$PORT` (Cloud Run, Knative):
  stock nginx always listens on 8080 and proxies to uvicorn on a fixed 127.0.0.1:8000. A small
  script rewrites those two ports in MLflow's nginx.conf and then runs MLflow's own entrypoint
  code unchanged. Without $PORT the stock ports stay, and the container serves as stock does.

Trade-offs, and why the native (default) and layered builders are preferred to this one: with a
private index or CA bundle the wheelhouse is copied into stock's stage and deleted after the
installs, so the image carries the downloaded wheels once more in that layer (the classic
builder, which is what the docker SDK and Podman's API speak, has no build-time mounts to avoid
it). Stock images are also larger (full mlflow, nginx), run as root, and are rebuilt from
scratch for every version (no shared runtime, no registry assembly).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.builder import BuildRequest, LocalImage
from mlflow_dock.imaging.dockerfile import BUILD_DIR, PipOptions
from mlflow_dock.imaging.engine import DockerEngine

# Where the shim's venv lives when the base image is replaced; not a path stock uses.
SHIM_VENV = "/opt/mlflow-dock/python"
ENTRYPOINT_PATH = "/opt/mlflow-dock/serve.py"
# Context paths of the in-memory files; `_build/` is removed from the image after the build.
_BUILD_CONTEXT_DIR = "_build"
_ENTRYPOINT_CONTEXT_PATH = "_mlflow_dock/serve.py"

_NGINX_DIRS = "/var/log/nginx /var/lib/nginx"
_WHEELS_CONTEXT_PATH = "_mlflow_dock/wheels.txt"
_OFFLINE_CONF_CONTEXT_PATH = "_mlflow_dock/offline-pip.conf"
# The downloaded wheels, in the unpublished stage and then (deleted again) in stock's.
WHEELHOUSE = "/tmp/mlflow-dock-wheels"  # noqa: S108 - build-time only
_WHEELS_STAGE = "mlflow-dock-wheels"
# What stock's `C._install_pyfunc_deps` installs besides the model's requirements (MLflow's
# container module hard-codes it); a change there makes the offline install fail, not leak.
_STOCK_SERVER_DEPS = "gunicorn[gevent]"
_OFFLINE_PIP_CONF = f"""\
[global]
no-cache-dir = true
disable-pip-version-check = true
no-index = true
find-links = {WHEELHOUSE}
"""

_FROM = re.compile(r"^FROM\s+(\S+)\s*$", re.MULTILINE)
_ENTRYPOINT = re.compile(r"^ENTRYPOINT\s+(\[.*\])\s*$", re.MULTILINE)
_INSTALL_MLFLOW = re.compile(r"^RUN pip install (mlflow==[\w.+!-]+)\s*$", re.MULTILINE)

# Runs in the image before MLflow's own entrypoint code (appended below it verbatim). With $PORT
# set, nginx listens on $PORT and uvicorn moves off its fixed 8000 to a free port: on the host
# network 8000 may be taken (it is mlflow-dock's own default port) and two stock containers would
# collide there. `_serve_pyfunc` reads DEFAULT_INFERENCE_SERVER_PORT at call time, and nginx.conf's
# upstream must agree with it. Without $PORT the stock ports are (re)stored, so a container that
# once ran with $PORT and restarts without it is stock again.
_PORT_PRELUDE = '''\
"""mlflow-dock: let MLflow's stock serving honour $PORT, then start it unchanged."""
import os
import re
import socket
from pathlib import Path

import mlflow.models
from mlflow.models import container as _container


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if os.environ.get("PORT"):
    _public, _inner = int(os.environ["PORT"]), _free_port()
else:
    # getattr: the model's requirements may pin an older mlflow than the generator's.
    _public = getattr(_container, "DEFAULT_NGINX_SERVER_PORT", 8080)
    _inner = getattr(_container, "DEFAULT_INFERENCE_SERVER_PORT", 8000)
_container.DEFAULT_INFERENCE_SERVER_PORT = _inner
_conf = Path(mlflow.models.__file__).parent / "container" / "scoring_server" / "nginx.conf"
_old = _conf.read_text()
_new = re.sub(r"listen \\d+", f"listen {_public}", _old)
_new = re.sub(r"server 127\\.0\\.0\\.1:\\d+;", f"server 127.0.0.1:{_inner};", _new)
if _new != _old:
    _conf.write_text(_new)

# MLflow's own entrypoint, as its Dockerfile generator wrote it:
'''


def render_stock_context(
    model_dir: Path,
    context: Path,
    *,
    base_image: str | None,
    python_version: str,
    pip: PipOptions,
    ca_bundle: bytes | None,
) -> dict[str, bytes]:
    """Write MLflow's Dockerfile and model copy into `context`; return the in-memory files.

    `base_image` is the configured MLFLOW_DOCK_BASE_IMAGE (None keeps stock's python slim image);
    "{python_version}" in it becomes the model's major.minor `python_version`. With
    ``pip.only_binary`` off (MLFLOW_DOCK_ALLOW_SDISTS) the stage that holds the index settings
    builds wheels from sdists, i.e. runs their build code next to the credentials.
    """
    _generate(model_dir, context)
    dockerfile = context / "Dockerfile"
    stock = dockerfile.read_text()
    entrypoint_code = _stock_entrypoint_code(stock)
    # The pip.conf must point at a CA bundle only if one is shipped, or every install fails.
    pip = dataclasses.replace(pip, has_ca_bundle=ca_bundle is not None)
    extra = {
        f"{_BUILD_CONTEXT_DIR}/pip.conf": pip.pip_conf().encode(),
        _ENTRYPOINT_CONTEXT_PATH: (_PORT_PRELUDE + entrypoint_code + "\n").encode(),
    }
    if ca_bundle is not None:
        extra[f"{_BUILD_CONTEXT_DIR}/ca-bundle.crt"] = ca_bundle
    wheels: _Wheels | None = None
    if pip.index_url or pip.extra_index_urls or ca_bundle is not None:
        wheels = _Wheels(mlflow=_stock_mlflow_pin(stock), only_binary=pip.only_binary)
        extra[_WHEELS_CONTEXT_PATH] = _model_wheel_requirements(model_dir).encode()
        offline = _OFFLINE_PIP_CONF + ("only-binary = :all:\n" if pip.only_binary else "")
        extra[_OFFLINE_CONF_CONTEXT_PATH] = offline.encode()
    dockerfile.write_text(
        _adapt(stock, base_image=base_image, python_version=python_version, wheels=wheels)
    )
    return extra


@dataclasses.dataclass(frozen=True)
class _Wheels:
    """The unpublished download stage: stock's mlflow pin, and whether sdists may be built."""

    mlflow: str
    only_binary: bool


def _stock_mlflow_pin(text: str) -> str:
    """The `mlflow==X` of stock's `RUN pip install mlflow==X` (the generator's own version)."""
    match = _INSTALL_MLFLOW.search(text)
    if match is None:
        # E.g. a development MLflow, which stock installs from a GitHub archive (an sdist).
        raise PermanentError(
            "MLflow's generated Dockerfile installs mlflow in a way that cannot be downloaded "
            "ahead from the configured index"
        )
    return match.group(1)


def _model_wheel_requirements(model_dir: Path) -> str:
    """What stock's `_install_pyfunc_deps` installs for the model, as requirement lines.

    Its pip run takes python_env.yaml's build dependencies and dependencies, `-r
    requirements.txt` meaning the model's file. Only requirement lines are kept: an option line
    (``--no-binary``, ``--index-url``, another ``-r``) never reaches the stage that holds the
    credentials; if the offline install needs what it would have fetched, it fails there.
    """
    from mlflow.models import Model
    from mlflow.pyfunc import ENV, FLAVOR_NAME
    from mlflow.utils.environment import _PythonEnv

    flavor = Model.load(str(model_dir)).flavors.get(FLAVOR_NAME) or {}
    env = flavor.get(ENV)
    # Stock reads the virtualenv spec; a model without one installs nothing of its own.
    spec = env.get("virtualenv") if isinstance(env, dict) else None
    lines: list[str] = []
    if spec:
        python_env = _PythonEnv.from_yaml(str(model_dir / spec))  # type: ignore[no-untyped-call]
        for dependency in [*python_env.build_dependencies, *python_env.dependencies]:
            words = str(dependency).split()
            if words[:1] == ["-r"] and words[1:] and words[-1].endswith("requirements.txt"):
                lines.extend((model_dir / "requirements.txt").read_text().splitlines())
            else:
                lines.append(str(dependency))
    kept = []
    for raw in lines:
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line and not line.startswith("-"):
            kept.append(line)
    return "\n".join(kept) + "\n"


def _generate(model_dir: Path, context: Path) -> None:
    """MLflow's generator, as `mlflow models generate-dockerfile --env-manager local` runs it."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.pyfunc import FLAVOR_NAME
    from mlflow.pyfunc.backend import PyFuncBackend

    flavor = Model.load(str(model_dir)).flavors.get(FLAVOR_NAME)
    if flavor is None:
        raise PermanentError("model has no python_function flavor, so it cannot be served")
    # The CLI picks this backend through get_flavor_backend, which first downloads the model to
    # a temporary directory only to read MLmodel; here it is already local.
    backend = PyFuncBackend(flavor, env_manager="local")  # type: ignore[no-untyped-call]
    try:
        backend.generate_dockerfile(  # type: ignore[no-untyped-call]
            model_uri=str(model_dir), output_dir=str(context)
        )
    except MlflowException as exc:
        # E.g. a Java flavor, which stock serves only from Ubuntu with conda or virtualenv.
        raise PermanentError(f"MLflow's Dockerfile generator refused the model: {exc}") from None


def _adapt(
    text: str, *, base_image: str | None, python_version: str, wheels: _Wheels | None
) -> str:
    froms = _FROM.findall(text)
    entrypoints = _ENTRYPOINT.findall(text)
    if len(froms) != 1 or len(entrypoints) != 1:
        # Our insertions assume MLflow's one-stage template; fail loudly if MLflow changed it.
        raise PermanentError(
            "MLflow's generated Dockerfile has an unexpected shape "
            f"({len(froms)} FROM, {len(entrypoints)} ENTRYPOINT lines)"
        )
    stock_base = froms[0]
    base = stock_base
    shim = ""
    if base_image:
        base = base_image.replace("{python_version}", python_version)
        shim = (
            "# mlflow-dock: stock runs `python`, `pip` and `uvicorn` from PATH; a venv of the\n"
            "# base's python3 provides all three on bases that ship only python3.\n"
            f"RUN python3 -m venv {SHIM_VENV}\n"
            f"ENV PATH={SHIM_VENV}/bin:$PATH\n"
        )
    replaced = f"# mlflow-dock: MLFLOW_DOCK_BASE_IMAGE replaces stock's {stock_base}\n"
    setup = f"FROM {base}\n" + (replaced if shim else "") + shim
    if wheels is None:
        setup += (
            "# mlflow-dock: pip's quiet options for every pip run of the build (no index or CA\n"
            "# bundle is configured, so nothing here is secret).\n"
            f"COPY {_BUILD_CONTEXT_DIR}/ {BUILD_DIR}/\n"
            f"ENV PIP_CONFIG_FILE={BUILD_DIR}/pip.conf\n"
        )
    else:
        setup = (
            _wheels_stage(base, shim, wheels)
            + setup
            + (
                "# mlflow-dock: stock's pip runs install offline from the wheelhouse; the index\n"
                f"# settings stayed in the {_WHEELS_STAGE} stage, which is never pushed.\n"
                f"COPY --from={_WHEELS_STAGE} {WHEELHOUSE} {WHEELHOUSE}\n"
                f"COPY {_OFFLINE_CONF_CONTEXT_PATH} {BUILD_DIR}/pip.conf\n"
                f"ENV PIP_CONFIG_FILE={BUILD_DIR}/pip.conf\n"
            )
        )
    text = _FROM.sub(lambda _: setup.rstrip("\n"), text, count=1)
    cleanup = f"{BUILD_DIR} {WHEELHOUSE}" if wheels is not None else BUILD_DIR
    serve = (
        "# mlflow-dock: build inputs out of the final filesystem; stock's entrypoint code runs\n"
        "# unchanged after a prelude that honours $PORT.\n"
        f"RUN rm -rf {cleanup} \\\n"
        # nginx logs (and links its logs) and keeps request bodies there, also as a non-root user.
        f" && mkdir -p {_NGINX_DIRS} && chmod 1777 {_NGINX_DIRS}\n"
        "ENV PIP_CONFIG_FILE=\n"
        f"COPY {_ENTRYPOINT_CONTEXT_PATH} {ENTRYPOINT_PATH}\n"
        f'ENTRYPOINT ["python", "{ENTRYPOINT_PATH}"]\n'
        f"# MLflow's: ENTRYPOINT {entrypoints[0]}"
    )
    return _ENTRYPOINT.sub(lambda _: serve, text, count=1)


def _wheels_stage(base: str, shim: str, wheels: _Wheels) -> str:
    """The stage that holds the index settings: it downloads, installs nothing, is not pushed.

    The same base (and shim) as stock's stage, so pip picks the wheels for the interpreter that
    will install them. Three downloads, as stock's three pip runs resolve separately.
    """
    binary = "--only-binary :all: " if wheels.only_binary else ""
    fetch = f"python -m pip wheel {binary}--wheel-dir {WHEELHOUSE}"
    return (
        f"FROM {base} AS {_WHEELS_STAGE}\n"
        + shim
        + "# mlflow-dock: index URLs and CA bundle (in-memory build context) are used here only.\n"
        f"COPY {_BUILD_CONTEXT_DIR}/ {BUILD_DIR}/\n"
        f"COPY {_WHEELS_CONTEXT_PATH} {BUILD_DIR}/wheels.txt\n"
        f"RUN export PIP_CONFIG_FILE={BUILD_DIR}/pip.conf \\\n"
        f" && {fetch} {wheels.mlflow} \\\n"
        f" && {fetch} '{_STOCK_SERVER_DEPS}' \\\n"
        f" && {fetch} -r {BUILD_DIR}/wheels.txt \\\n"
        f" && rm -rf {BUILD_DIR}\n\n"
    )


def _stock_entrypoint_code(text: str) -> str:
    """The code of MLflow's `ENTRYPOINT ["python", "-c", CODE]`."""
    match = _ENTRYPOINT.search(text)
    if match is None:
        raise PermanentError("MLflow's generated Dockerfile has no ENTRYPOINT")
    argv = json.loads(match.group(1))
    if argv[:2] != ["python", "-c"] or len(argv) != 3:
        raise PermanentError(f"MLflow's generated ENTRYPOINT is not `python -c`: {argv}")
    return str(argv[2])


class StockBuilder:
    """The ``Builder`` strategy for MLFLOW_DOCK_BUILDER=mlflow: MLflow's Dockerfile, then as usual.

    Its images share no runtime layers, so there is nothing to assemble on and nothing to keep
    warm: every version is built whole by the engine.
    """

    description = "stock build"
    means = "MLflow's stock Dockerfile"

    def __init__(
        self, engine: DockerEngine, *, base_image: str | None, timeout_seconds: int
    ) -> None:
        self._engine = engine
        # The configured MLFLOW_DOCK_BASE_IMAGE as given (None: MLflow's own python:X.Y-slim).
        self._base_image = base_image
        self._timeout = timeout_seconds

    def build(self, request: BuildRequest) -> LocalImage:
        context = request.work / "stock"
        request.step("build")
        request.log("building with MLflow's stock Dockerfile (MLFLOW_DOCK_BUILDER=mlflow)")
        extra_files = render_stock_context(
            request.package.path,
            context,
            base_image=self._base_image,
            python_version=request.package.python_version,
            pip=request.spec.pip,
            ca_bundle=request.build_files.get("_build/ca-bundle.crt"),
        )
        reference = str(request.target.with_tag(request.tag))
        self._engine.build(
            context,
            extra_files=extra_files,
            tag=reference,
            labels=dict(request.labels),
            log=request.log,
            timeout=self._timeout,
        )
        return LocalImage(reference, shares_runtime=False, speaks_v2=False)
