"""Rendering of the serving image's Dockerfile and its build inputs (pure: no I/O).

Layers go from least to most volatile so that every version of a model whose requirements did
not change reuses all layers but the last:

    base image -> system packages (only if a requirement needs them) -> Python requirements
    (installed from requirements.txt copied alone) -> the model server (mlflow_dock.serving,
    the same files in every runtime) and serving settings -> model artifacts -> the version's
    V2 name and version (ENV)

Build-only inputs (pip.conf with index URLs that may hold credentials, a corporate CA bundle) are
copied into the `deps` stage only. The final stage copies the finished virtualenv out of it, so
neither the files nor the instructions that used them reach the pushed image or its history.
The runtime (everything but the model) is built once per distinct input and tagged locally;
each version's image is `FROM` that runtime plus one `COPY` of the model.
Image labels are not written here: they differ per version and are passed to the engine at
build time, where they cannot invalidate the cached layers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mlflow_dock.serving import layer as serving_layer

SERVING_PORT = 8080
MODEL_DIR = "/opt/ml/model"
VENV_DIR = "/opt/mlflow-dock/venv"
BUILD_DIR = "/tmp/mlflow-dock-build"  # noqa: S108 - lives only in the discarded deps stage
RUNTIME_UID = 10001

# Shared libraries some popular ML wheels load at run time but do not ship.
_SYSTEM_PACKAGES_FOR: Mapping[str, tuple[str, ...]] = {
    "lightgbm": ("libgomp1",),
    "xgboost": ("libgomp1",),
    "catboost": ("libgomp1",),
    "opencv-python": ("libgl1", "libglib2.0-0"),
    "prophet": ("build-essential",),
}

_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(line: str) -> str | None:
    """The normalised distribution name of a requirements line, or None for options/comments."""
    stripped = line.split("#", 1)[0].strip()
    if not stripped or stripped.startswith("-"):
        return None
    match = _REQUIREMENT_NAME.match(stripped)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None


def serving_requirements(model_requirements: str) -> str:
    """The model's requirements with full `mlflow` swapped for `mlflow-skinny` at the same pin.

    Serving a pyfunc model needs only mlflow-skinny (it brings FastAPI and uvicorn); the full
    package adds the tracking server, UI, pyarrow and matplotlib: hundreds of MB that serve nothing.
    """
    lines = []
    has_mlflow = False
    for raw in model_requirements.splitlines():
        # pip's own rule: "#" starts a comment at line start or after whitespace (URLs keep
        # their "#egg=" fragments). Dropping comments keeps the requirements hash stable.
        line = re.sub(r"(^|\s)#.*$", "", raw)
        name = requirement_name(line)
        if name == "mlflow":
            has_mlflow = True
            rest = line.strip()[len("mlflow") :]
            rest = re.sub(r"^\[[^\]]*\]", "", rest)  # extras of the full package do not apply
            lines.append(f"mlflow-skinny{rest}")
        elif name is not None or line.strip().startswith("-"):
            lines.append(line.strip())
    if not has_mlflow:
        lines.insert(0, "mlflow-skinny")
    return "\n".join(lines) + "\n"


def system_packages_for(requirements: str) -> tuple[str, ...]:
    wanted: set[str] = set()
    for line in requirements.splitlines():
        name = requirement_name(line)
        if name is not None:
            wanted.update(_SYSTEM_PACKAGES_FOR.get(name, ()))
    return tuple(sorted(wanted))


def requirements_hash(requirements: str) -> str:
    return hashlib.sha256(requirements.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PipOptions:
    """How pip reaches packages during the build; never part of the final image."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    has_ca_bundle: bool = False
    # Wheels only: a source distribution runs the model author's setup.py at build time
    # (imaging/requirements.py); off only with MLFLOW_DOCK_ALLOW_SDISTS.
    only_binary: bool = True

    def pip_conf(self) -> str:
        lines = ["[global]", "no-cache-dir = true", "disable-pip-version-check = true"]
        if self.only_binary:
            lines.append("only-binary = :all:")
        if self.index_url:
            lines.append(f"index-url = {self.index_url}")
        if self.extra_index_urls:
            lines.append("extra-index-url = " + " ".join(self.extra_index_urls))
        if self.has_ca_bundle:
            lines.append(f"cert = {BUILD_DIR}/ca-bundle.crt")
        return "\n".join(lines) + "\n"

    def uv_toml(self) -> str:
        """The same indexes for uv, which reads its own config file (and SSL_CERT_FILE)."""
        lines = ["[pip]"]
        if self.index_url:
            lines.append(f"index-url = {json.dumps(self.index_url)}")
        if self.extra_index_urls:
            lines.append(f"extra-index-url = {json.dumps(list(self.extra_index_urls))}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ImageSpec:
    base_image: str
    requirements: str
    system_packages: tuple[str, ...] = ()
    pip: PipOptions = field(default_factory=PipOptions)
    # The model server's layer (path in the image -> content): part of the runtime, so a new
    # server means a new runtime key. Read from the installed mlflow-dock by default.
    serving_files: Mapping[str, bytes] = field(
        default_factory=serving_layer.layer_files, repr=False, compare=False
    )


_HEALTHCHECK = json.dumps(
    [
        "python",
        "-c",
        "import os, urllib.request; urllib.request.urlopen("
        f"'http://127.0.0.1:%s/ping' % os.environ.get('PORT', '{SERVING_PORT}'), timeout=4)",
    ]
)
# No nginx in front (so no 5 MB body limit): mlflow-dock's own server (mlflow_dock.serving)
# runs MLflow's scoring app and the V2 routes under uvicorn, and reads $PORT itself (Cloud Run,
# Knative), so no shell is needed.
_SERVE = json.dumps(list(serving_layer.SERVE_COMMAND))
# The build context directory the serving layer's files are written to (layered.py).
SERVING_CONTEXT_DIR = "serving"


# The same command and health check as JSON lists, for images assembled without a Dockerfile
# (imaging/native.py): both builders' images must start the same way.
SERVE_COMMAND: tuple[str, ...] = serving_layer.SERVE_COMMAND
HEALTHCHECK_COMMAND: tuple[str, ...] = tuple(json.loads(_HEALTHCHECK))


def _pip_settings_for_uv(spec: ImageSpec) -> str:
    """Shell handing the base image's pip settings to uv, which reads none of pip's own.

    Stock MLflow installs with pip, which honours the base image's PIP_* variables, its pip.conf
    files and (pip >= 24.2) the system CA store; ``pip config get`` reads them exactly as pip
    would. Settings mlflow-dock was given (uv.toml, its CA bundle) still win: they are set
    closer to the uv command.
    """
    # `pip config list` prints every file's values as section.key='value', later files (which
    # win in pip) last; `pip config get` would read one file only.
    listed = f"{VENV_DIR}/bin/python -m pip config list 2>/dev/null"
    mapping = [("PIP_CERT", "cert", "SSL_CERT_FILE")]
    mapping.append(("PIP_TRUSTED_HOST", "trusted-host", "UV_INSECURE_HOST"))
    if not spec.pip.index_url:
        mapping.append(("PIP_INDEX_URL", "index-url", "UV_INDEX_URL"))
    if not spec.pip.extra_index_urls:
        mapping.append(("PIP_EXTRA_INDEX_URL", "extra-index-url", "UV_EXTRA_INDEX_URL"))
    lines = ["if [ -d /etc/ssl/certs ]; then export UV_NATIVE_TLS=1; fi"]
    for env, key, uv_env in mapping:
        found = f"{listed} | sed -nE \"s/^(global|install)\\.{key}='(.*)'$/\\2/p\" | tail -n 1"
        # Braces keep the ";" inside one link of the && chain.
        lines.append(
            f'{{ v="${{{env}:-$({found})}}"; if [ -n "$v" ]; then export {uv_env}="$v"; fi; }}'
        )
    return " \\\n && ".join(lines)


def render_runtime_dockerfile(spec: ImageSpec) -> str:
    """Everything but the model: built once per runtime key and tagged locally.

    The build context holds requirements.txt, _build/ (pip.conf, CA bundle) and serving/
    (the model server's layer, :func:`serving_context_files`).
    """
    apt = ""
    if spec.system_packages:
        apt = (
            "RUN apt-get update \\\n"
            " && apt-get install -y --no-install-recommends "
            + " ".join(spec.system_packages)
            + " \\\n && rm -rf /var/lib/apt/lists/*\n"
        )
    # uv installs the requirements (parallel downloads: the cold build is mostly fetching
    # wheels); pip only fetches uv itself. Both read the same indexes and CA bundle.
    ca_env = f"SSL_CERT_FILE={BUILD_DIR}/ca-bundle.crt " if spec.pip.has_ca_bundle else ""
    only_binary = "--only-binary :all: " if spec.pip.only_binary else ""
    return f"""\
FROM {spec.base_image} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    LANG=C.UTF-8
{apt}RUN mkdir -p /home/mlflow && chown {RUNTIME_UID}:{RUNTIME_UID} /home/mlflow

FROM runtime AS deps
COPY _build/ {BUILD_DIR}/
COPY requirements.txt {BUILD_DIR}/requirements.txt
RUN python3 -m venv {VENV_DIR} \\
 && PIP_CONFIG_FILE={BUILD_DIR}/pip.conf {VENV_DIR}/bin/python -m pip install \\
      --no-cache-dir --target {BUILD_DIR}/uv uv \\
 && {_pip_settings_for_uv(spec)} \\
 && {ca_env}UV_CONFIG_FILE={BUILD_DIR}/uv.toml {BUILD_DIR}/uv/bin/uv pip install \\
      --no-cache {only_binary}--python {VENV_DIR}/bin/python -r {BUILD_DIR}/requirements.txt \\
 && find {VENV_DIR} -name __pycache__ -prune -exec rm -rf {{}} +

FROM runtime
COPY --from=deps {VENV_DIR} {VENV_DIR}
COPY {SERVING_CONTEXT_DIR}/ {serving_layer.SERVING_DIR}/
ENV PATH={VENV_DIR}/bin:$PATH \\
    HOME=/home/mlflow \\
    PYTHONPATH={serving_layer.RUNTIME_ENV["PYTHONPATH"]} \\
    __pyfunc_model_path__={MODEL_DIR} \\
    MLFLOW_DOCK_SERVING_PORT={SERVING_PORT}
USER {RUNTIME_UID}:{RUNTIME_UID}
EXPOSE {SERVING_PORT}
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \\
  CMD {_HEALTHCHECK}
CMD {_SERVE}
"""


def serving_context_files(spec: ImageSpec) -> dict[str, bytes]:
    """The serving layer's files as build context paths (``serving/<path under SERVING_DIR>``)."""
    inside = serving_layer.SERVING_DIR.strip("/") + "/"
    return {
        f"{SERVING_CONTEXT_DIR}/{path.removeprefix(inside)}": data
        for path, data in spec.serving_files.items()
    }


def render_model_dockerfile(
    runtime_image: str,
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """One version's image: the shared runtime image plus the model as the only new layer.

    A separate build rather than one multi-stage Dockerfile because the classic builder does not
    reuse its cache for `COPY --from`: every version would re-copy (and re-push) the whole
    virtualenv as a new layer. ``env`` (the version's V2 name and version) comes after the
    model, where registry assembly of the next version replaces it (oci/mutate.py). Labels go
    in one instruction after that: labels passed to the engine's build API cost one committed
    container each (~85 ms apiece).
    """
    text = f"FROM {runtime_image}\nCOPY model/ {MODEL_DIR}/\n"
    if env:
        pairs = " \\\n    ".join(f"{key}={_quote(value)}" for key, value in env.items())
        text += f"ENV {pairs}\n"
    if labels:
        pairs = " \\\n      ".join(
            f"{_quote(key)}={_quote(value)}" for key, value in sorted(labels.items())
        )
        text += f"LABEL {pairs}\n"
    return text


def _quote(value: str) -> str:
    # Dockerfile double-quoted words honour backslash escapes; a newline cannot be escaped.
    cleaned = " ".join(value.splitlines())
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def runtime_key(spec: ImageSpec, *, ca_bundle: bytes | None) -> str:
    """Identity of a runtime image: equal keys give interchangeable images."""
    digest = hashlib.sha256()
    for part in (
        render_runtime_dockerfile(spec).encode(),
        # The model server's files: a new server is a new runtime, never assembled on.
        *(path.encode() + b"\0" + data for path, data in sorted(spec.serving_files.items())),
        # The model layer's recipe too: registry assembly reuses a runtime only if the layer it
        # appends would be the one the engine builds.
        render_model_dockerfile("", env=dict.fromkeys(serving_layer.VERSION_ENV, "")).encode(),
        spec.requirements.encode(),
        spec.pip.pip_conf().encode(),
        spec.pip.uv_toml().encode(),
        ca_bundle or b"",
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def image_labels(
    *,
    model_name: str,
    version: str,
    run_id: str | None,
    source: str | None,
    requirements_digest: str,
    created: str,
    image_source: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> dict[str, str]:
    labels = {
        "org.opencontainers.image.title": f"{model_name} v{version}",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.vendor": "mlflow-dock",
        "io.mlflow-dock.model.name": model_name,
        "io.mlflow-dock.model.version": version,
        "io.mlflow-dock.model.run-id": run_id or "",
        "io.mlflow-dock.model.source": source or "",
        "io.mlflow-dock.requirements.sha256": requirements_digest,
    }
    if image_source:
        labels["org.opencontainers.image.source"] = image_source
    labels.update(extra)
    return labels
