"""MLFLOW_DOCK_BUILDER=mlflow: MLflow's own generator plus mlflow-dock's small insertions."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.version import VERSION as MLFLOW_VERSION

import mlflow
from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.dockerfile import PipOptions
from mlflow_dock.imaging.stock import ENTRYPOINT_PATH, render_stock_context

# What MLflow writes for a pyfunc model, by hand: logging a real one costs seconds per test.
MLMODEL = """\
artifact_path: model
flavors:
  python_function:
    cloudpickle_version: 3.1.1
    env:
      conda: conda.yaml
      virtualenv: python_env.yaml
    loader_module: mlflow.pyfunc.model
    python_model: python_model.pkl
    python_version: 3.11.7
mlflow_version: 3.17.2
model_uuid: 0123456789abcdef0123456789abcdef
"""
PYTHON_ENV = """\
python: 3.11.7
build_dependencies:
- pip
dependencies:
- -r requirements.txt
"""
BASE = "mlflow-dock-test-base:bookworm-py{python_version}"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "download" / "model"
    path.mkdir(parents=True)
    (path / "MLmodel").write_text(MLMODEL)
    (path / "python_env.yaml").write_text(PYTHON_ENV)
    (path / "requirements.txt").write_text("mlflow==3.17.2\ncloudpickle==3.1.1\n")
    (path / "conda.yaml").write_text("name: mlflow-env\ndependencies:\n- python=3.11.7\n")
    (path / "python_model.pkl").write_bytes(b"not really a pickle")
    return path


def render(
    model_dir: Path,
    context: Path,
    *,
    base_image: str | None = None,
    pip: PipOptions | None = None,
    ca_bundle: bytes | None = None,
) -> tuple[str, dict[str, bytes]]:
    extra = render_stock_context(
        model_dir,
        context,
        base_image=base_image,
        python_version="3.11",
        pip=pip or PipOptions(),
        ca_bundle=ca_bundle,
    )
    return (context / "Dockerfile").read_text(), extra


def instructions(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]


def test_context_is_what_mlflows_generator_writes(model_dir: Path, tmp_path: Path) -> None:
    text, extra = render(model_dir, tmp_path / "ctx")
    # Stock's own steps, from MLflow's template rather than a copy of it.
    assert text.splitlines()[0] == "# Build an image that can serve mlflow models."
    assert "FROM python:3.11.7-slim\n" in text  # the full version from python_env.yaml
    assert "apt-get install -y --no-install-recommends nginx" in text
    assert f"RUN pip install mlflow=={MLFLOW_VERSION}\n" in text
    assert "COPY model_dir/model /opt/ml/model\n" in text
    assert "C._install_pyfunc_deps('/opt/ml/model', install_mlflow=False, env_manager='local')" in (
        text
    )
    assert "ENV MLFLOW_DISABLE_ENV_CREATION=True" in text
    # The generator copied the model into the context; the download is left as it was.
    assert (tmp_path / "ctx" / "model_dir" / "model" / "MLmodel").read_text() == MLMODEL
    assert (model_dir / "MLmodel").is_file()
    # No base image configured: stock's FROM stays, and so no shim.
    assert [i for i in instructions(text) if i.startswith("FROM")] == ["FROM python:3.11.7-slim"]
    assert "venv" not in text
    # MLflow's entrypoint code runs after the $PORT prelude, verbatim.
    entrypoints = [i for i in instructions(text) if i.startswith("ENTRYPOINT")]
    assert entrypoints == [f'ENTRYPOINT ["python", "{ENTRYPOINT_PATH}"]']
    serve = extra["_mlflow_dock/serve.py"].decode()
    assert serve.rstrip().endswith("from mlflow.models import container as C; C._serve('local')")
    compile(serve, "serve.py", "exec")


def test_configured_base_image_replaces_from_and_gets_a_python_shim(
    model_dir: Path, tmp_path: Path
) -> None:
    text, _ = render(model_dir, tmp_path / "ctx", base_image=BASE)
    lines = instructions(text)
    assert [i for i in lines if i.startswith("FROM")] == [
        "FROM mlflow-dock-test-base:bookworm-py3.11"
    ]
    assert "python:3.11.7-slim" not in "\n".join(lines)
    # The shim comes before anything of stock's that runs python or pip.
    shim = lines.index("RUN python3 -m venv /opt/mlflow-dock/python")
    path = lines.index("ENV PATH=/opt/mlflow-dock/python/bin:$PATH")
    first_pip = lines.index(f"RUN pip install mlflow=={MLFLOW_VERSION}")
    assert lines[0].startswith("FROM") and shim < path < first_pip


PRIVATE = PipOptions(
    index_url="https://user:tok3n@pypi.corp/simple",
    extra_index_urls=("https://x:s3cret@extra.corp/simple",),
    has_ca_bundle=True,
)


def stages(text: str) -> list[list[str]]:
    """The Dockerfile's instructions, one list per stage."""
    found: list[list[str]] = []
    for line in instructions(text):
        if line.startswith("FROM"):
            found.append([])
        found[-1].append(line)
    return found


def test_index_settings_stay_in_a_download_stage_that_is_not_pushed(
    model_dir: Path, tmp_path: Path
) -> None:
    text, extra = render(model_dir, tmp_path / "ctx", base_image=BASE, pip=PRIVATE, ca_bundle=b"CA")
    conf = extra["_build/pip.conf"].decode()
    assert "index-url = https://user:tok3n@pypi.corp/simple" in conf
    assert "extra-index-url = https://x:s3cret@extra.corp/simple" in conf
    assert "cert = /tmp/mlflow-dock-build/ca-bundle.crt" in conf
    assert extra["_build/ca-bundle.crt"] == b"CA"
    wheels, final = stages(text)
    assert wheels[0] == "FROM mlflow-dock-test-base:bookworm-py3.11 AS mlflow-dock-wheels"
    assert "COPY _build/ /tmp/mlflow-dock-build/" in wheels
    # Downloads only (no package code runs), stock's three pip runs' worth, then deleted.
    (fetch,) = [i for i in wheels if i.startswith("RUN export PIP_CONFIG_FILE=")]
    block = text[text.index(fetch) :].split("\n\n")[0]
    assert block.count("python -m pip wheel --only-binary :all: --wheel-dir ") == 3
    assert f"mlflow=={MLFLOW_VERSION}" in block and "'gunicorn[gevent]'" in block
    assert block.rstrip().endswith("&& rm -rf /tmp/mlflow-dock-build")
    assert "pip install" not in block
    # The pushed stage never sees the index settings: stock's pip runs go offline.
    assert not any("_build" in i for i in final)
    config = final.index("ENV PIP_CONFIG_FILE=/tmp/mlflow-dock-build/pip.conf")
    assert (
        final.index("COPY _mlflow_dock/offline-pip.conf /tmp/mlflow-dock-build/pip.conf") < config
    )
    copy = "COPY --from=mlflow-dock-wheels /tmp/mlflow-dock-wheels /tmp/mlflow-dock-wheels"
    assert final.index(copy) < config
    offline = extra["_mlflow_dock/offline-pip.conf"].decode()
    assert "no-index = true" in offline and "find-links = /tmp/mlflow-dock-wheels" in offline
    pip_runs = [n for n, i in enumerate(final) if "pip install" in i or "_install_pyfunc" in i]
    assert len(pip_runs) == 2 and config < min(pip_runs)
    cleanup = final.index("RUN rm -rf /tmp/mlflow-dock-build /tmp/mlflow-dock-wheels \\")
    assert max(pip_runs) < cleanup < final.index("ENV PIP_CONFIG_FILE=")
    # Secrets travel only in the in-memory build inputs, never in the Dockerfile text.
    assert "tok3n" not in text and "s3cret" not in text
    for name, data in extra.items():
        if not name.startswith("_build/"):
            assert b"tok3n" not in data and b"s3cret" not in data


def test_every_stock_pip_run_installs_wheels_only_unless_sdists_are_allowed(
    model_dir: Path, tmp_path: Path
) -> None:
    # pip reads only-binary from PIP_CONFIG_FILE, which every stock pip run above gets.
    _, extra = render(model_dir, tmp_path / "ctx")
    assert "only-binary = :all:" in extra["_build/pip.conf"].decode().splitlines()
    _, extra = render(model_dir, tmp_path / "ctx2", pip=PipOptions(only_binary=False))
    assert "only-binary" not in extra["_build/pip.conf"].decode()


def test_the_download_stage_fetches_the_models_requirements_without_options(
    model_dir: Path, tmp_path: Path
) -> None:
    (model_dir / "requirements.txt").write_text(
        "mlflow==3.17.2  # pinned\n--no-binary :all:\n-i https://elsewhere/simple\ncloudpickle\n"
    )
    _, extra = render(model_dir, tmp_path / "ctx", pip=PRIVATE)
    # python_env.yaml's build dependencies, then requirements.txt; option lines never reach
    # the stage with the credentials (a --no-binary would let sdists' build code run there).
    assert extra["_mlflow_dock/wheels.txt"].decode() == "pip\nmlflow==3.17.2\ncloudpickle\n"


def test_with_sdists_allowed_the_download_stage_may_build_wheels(
    model_dir: Path, tmp_path: Path
) -> None:
    text, extra = render(model_dir, tmp_path / "ctx", pip=replace(PRIVATE, only_binary=False))
    assert "python -m pip wheel --wheel-dir /tmp/mlflow-dock-wheels" in text
    assert "--only-binary" not in text and "_mlflow_dock/wheels.txt" in extra


def test_without_index_settings_stock_stays_one_stage(model_dir: Path, tmp_path: Path) -> None:
    text, extra = render(model_dir, tmp_path / "ctx", base_image=BASE)
    (only,) = stages(text)
    assert "COPY _build/ /tmp/mlflow-dock-build/" in only and "_mlflow_dock/wheels.txt" not in extra
    assert "RUN rm -rf /tmp/mlflow-dock-build \\" in only


def test_nginx_can_write_its_directories_as_a_non_root_user(
    model_dir: Path, tmp_path: Path
) -> None:
    # The smoke test runs every image as user 10001 on a read-only root, with tmpfs mounts over
    # these directories, which keep the directories' mode.
    text, _ = render(model_dir, tmp_path / "ctx")
    step = "&& mkdir -p /var/log/nginx /var/lib/nginx && chmod 1777 /var/log/nginx /var/lib/nginx"
    assert step in text
    assert text.index(step) > text.index("apt-get install -y --no-install-recommends nginx")


def test_pip_conf_names_a_ca_bundle_only_when_one_is_shipped(
    model_dir: Path, tmp_path: Path
) -> None:
    _, extra = render(model_dir, tmp_path / "ctx", pip=PipOptions(has_ca_bundle=True))
    assert "cert =" not in extra["_build/pip.conf"].decode()
    assert "_build/ca-bundle.crt" not in extra


def test_a_model_without_pyfunc_is_refused(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "MLmodel").write_text("flavors:\n  sklearn:\n    pickled_model: m.pkl\n")
    with pytest.raises(PermanentError, match="python_function"):
        render(model_dir, tmp_path / "ctx")


# --------------------------------------------------------------------------- $PORT prelude

STOCK_NGINX = (
    Path(mlflow.__file__).parent / "models" / "container" / "scoring_server" / "nginx.conf"
).read_text()


def run_serve(
    serve: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, port: str | None
) -> tuple[str, types.ModuleType, list[str]]:
    """Run the image's serve.py against a copy of nginx.conf and a stub `_serve`."""
    package = tmp_path / "site" / "mlflow" / "models"
    (package / "container" / "scoring_server").mkdir(parents=True, exist_ok=True)
    conf = package / "container" / "scoring_server" / "nginx.conf"
    if not conf.exists():
        conf.write_text(STOCK_NGINX)
    served: list[str] = []
    container = types.ModuleType("mlflow.models.container")
    container.DEFAULT_NGINX_SERVER_PORT = 8080  # type: ignore[attr-defined]
    container.DEFAULT_INFERENCE_SERVER_PORT = 8000  # type: ignore[attr-defined]
    container._serve = served.append  # type: ignore[attr-defined]
    models = types.ModuleType("mlflow.models")
    models.__file__ = str(package / "__init__.py")
    models.container = container  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow.models", models)
    monkeypatch.setitem(sys.modules, "mlflow.models.container", container)
    monkeypatch.setattr(mlflow, "models", models, raising=False)
    if port is None:
        monkeypatch.delenv("PORT", raising=False)
    else:
        monkeypatch.setenv("PORT", port)
    exec(compile(serve, "serve.py", "exec"), {"__name__": "__main__"})
    return conf.read_text(), container, served


def test_serve_honours_port_and_moves_uvicorn_off_8000(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, extra = render(model_dir, tmp_path / "ctx")
    serve = extra["_mlflow_dock/serve.py"].decode()

    conf, container, served = run_serve(serve, tmp_path, monkeypatch, "18123")
    inner = container.DEFAULT_INFERENCE_SERVER_PORT
    assert "listen 18123 deferred;" in conf and "8080" not in conf
    assert inner != 8000 and f"server 127.0.0.1:{inner};" in conf
    assert served == ["local"]  # MLflow's own entrypoint ran afterwards

    # Restarted without $PORT: exactly stock again.
    conf, container, served = run_serve(serve, tmp_path, monkeypatch, None)
    assert conf == STOCK_NGINX
    assert container.DEFAULT_INFERENCE_SERVER_PORT == 8000
    assert served == ["local"]


def test_stock_entrypoint_of_an_unexpected_shape_fails_loudly(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.models import docker_utils

    monkeypatch.setattr(
        docker_utils,
        "_DOCKERFILE_TEMPLATE",
        docker_utils._DOCKERFILE_TEMPLATE.replace("FROM {base_image}", "FROM a\nFROM {base_image}"),
    )
    with pytest.raises(PermanentError, match="unexpected shape"):
        render(model_dir, tmp_path / "ctx")
