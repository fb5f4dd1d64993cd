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
- pip's index URLs and CA bundle reach every stock `pip install` through `PIP_CONFIG_FILE`,
  copied in from the engine's in-memory build context (the Dockerfile text names only paths);
- the entrypoint honours `$PORT` (Cloud Run, Knative, and our smoke test on the host network):
  stock nginx always listens on 8080 and proxies to uvicorn on a fixed 127.0.0.1:8000. A small
  script rewrites those two ports in MLflow's nginx.conf and then runs MLflow's own entrypoint
  code unchanged. Without $PORT the stock ports stay, and the container serves as stock does.

Trade-off, and why the layered builder is the default: the stock Dockerfile is one stage, so
the build inputs (pip.conf, which may hold index credentials, and the CA bundle) are deleted in
a later layer but stay readable in the layer that copied them and in the image history. With a
private index whose URL carries a token, use the layered builder, whose multi-stage build keeps
them out of the pushed image. Stock images are also larger (full mlflow, nginx), run as root,
and are rebuilt from scratch for every version (no shared runtime, no registry assembly).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from mlflow_dock.build.dockerfile import BUILD_DIR, PipOptions
from mlflow_dock.errors import PermanentError

# Where the shim's venv lives when the base image is replaced; not a path stock uses.
SHIM_VENV = "/opt/mlflow-dock/python"
ENTRYPOINT_PATH = "/opt/mlflow-dock/serve.py"
# Context paths of the in-memory files; `_build/` is removed from the image after the build.
_BUILD_CONTEXT_DIR = "_build"
_ENTRYPOINT_CONTEXT_PATH = "_mlflow_dock/serve.py"

_FROM = re.compile(r"^FROM\s+(\S+)\s*$", re.MULTILINE)
_ENTRYPOINT = re.compile(r"^ENTRYPOINT\s+(\[.*\])\s*$", re.MULTILINE)

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
    "{python_version}" in it becomes the model's major.minor `python_version`.
    """
    _generate(model_dir, context)
    dockerfile = context / "Dockerfile"
    stock = dockerfile.read_text()
    entrypoint_code = _stock_entrypoint_code(stock)
    dockerfile.write_text(_adapt(stock, base_image=base_image, python_version=python_version))
    # The pip.conf must point at a CA bundle only if one is shipped, or every install fails.
    pip = dataclasses.replace(pip, has_ca_bundle=ca_bundle is not None)
    extra = {
        f"{_BUILD_CONTEXT_DIR}/pip.conf": pip.pip_conf().encode(),
        _ENTRYPOINT_CONTEXT_PATH: (_PORT_PRELUDE + entrypoint_code + "\n").encode(),
    }
    if ca_bundle is not None:
        extra[f"{_BUILD_CONTEXT_DIR}/ca-bundle.crt"] = ca_bundle
    return extra


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


def _adapt(text: str, *, base_image: str | None, python_version: str) -> str:
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
    setup = (
        f"FROM {base}\n"
        + (f"# mlflow-dock: MLFLOW_DOCK_BASE_IMAGE replaces stock's {stock_base}\n" if shim else "")
        + shim
        + "# mlflow-dock: pip settings (index URLs, CA bundle) for every pip run of the build;\n"
        "# removed again below, but this layer keeps them (see the layered builder).\n"
        f"COPY {_BUILD_CONTEXT_DIR}/ {BUILD_DIR}/\n"
        f"ENV PIP_CONFIG_FILE={BUILD_DIR}/pip.conf\n"
    )
    text = _FROM.sub(lambda _: setup.rstrip("\n"), text, count=1)
    serve = (
        "# mlflow-dock: build inputs out of the final filesystem; stock's entrypoint code runs\n"
        "# unchanged after a prelude that honours $PORT.\n"
        f"RUN rm -rf {BUILD_DIR}\n"
        "ENV PIP_CONFIG_FILE=\n"
        f"COPY {_ENTRYPOINT_CONTEXT_PATH} {ENTRYPOINT_PATH}\n"
        f'ENTRYPOINT ["python", "{ENTRYPOINT_PATH}"]\n'
        f"# MLflow's: ENTRYPOINT {entrypoints[0]}"
    )
    return _ENTRYPOINT.sub(lambda _: serve, text, count=1)


def _stock_entrypoint_code(text: str) -> str:
    """The code of MLflow's `ENTRYPOINT ["python", "-c", CODE]`."""
    match = _ENTRYPOINT.search(text)
    if match is None:
        raise PermanentError("MLflow's generated Dockerfile has no ENTRYPOINT")
    argv = json.loads(match.group(1))
    if argv[:2] != ["python", "-c"] or len(argv) != 3:
        raise PermanentError(f"MLflow's generated ENTRYPOINT is not `python -c`: {argv}")
    return str(argv[2])
