"""Fetching a registered model version from MLflow, with MLflow errors translated in one place."""

from __future__ import annotations

import dataclasses
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from packaging.requirements import InvalidRequirement, Requirement

from mlflow_dock.errors import MlflowDockError, PermanentError, RetryableError
from mlflow_dock.mlflow.sources import AllowedSources, SourceNotAllowed

# MLflow error codes that no retry can fix.
_PERMANENT_CODES = frozenset(
    {
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "BAD_REQUEST",
        "NOT_FOUND",
    }
)


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    source: str | None
    run_id: str | None
    status: str | None
    created_ms: int | None = None


@dataclass(frozen=True)
class ModelPackage:
    """A downloaded model directory and what the image build needs to know about it."""

    path: Path
    python_version: str  # major.minor
    requirements: str
    has_serving_example: bool
    # Read where the tracking server stores it (MLFLOW_DOCK_ARTIFACTS_DESTINATION), not a
    # downloaded copy: nothing may write into it.
    in_place: bool = False


class MlflowRefusedError(PermanentError):
    """MLflow answered with an error code no retry can fix; `code` is MLflow's own."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def translate_mlflow_error(exc: BaseException, what: str) -> Exception:
    """The single mapping from MLflow client failures to retryable or permanent job errors."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = str(exc.error_code)
        message = exc.message.splitlines()[0] if exc.message else code
        if code in _PERMANENT_CODES:
            return MlflowRefusedError(f"{what}: {message}", code=code)
        return RetryableError(f"{what}: MLflow error {code}: {message}")
    return RetryableError(f"{what}: cannot reach MLflow: {type(exc).__name__}: {exc}")


# models:/ and runs:/ URIs resolve to others; a chain longer than this is a loop.
_MAX_RESOLUTIONS = 5


class MlflowSource:
    def __init__(
        self,
        tracking_uri: str,
        *,
        allowed_sources: AllowedSources | None = None,
        artifacts_destination: Path | None = None,
    ) -> None:
        self._tracking_uri = tracking_uri
        # Without an explicit list: the tracking server's own artifacts only.
        self._allowed = allowed_sources or AllowedSources(tracking_uri)
        self._destination = artifacts_destination

    @staticmethod
    def import_client() -> None:
        """Import MLflow's client once, on the calling thread.

        mlflow is imported lazily (it takes seconds), but a first import racing in several
        threads (workers, write-back, reconciliation) deadlocks in importlib and leaves
        half-initialised modules behind; the service calls this before starting threads.
        """
        import mlflow.artifacts
        import mlflow.exceptions
        import mlflow.tracking  # noqa: F401

    def _client(self) -> Any:
        # Imported lazily: mlflow is heavy and only the worker needs it.
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self._tracking_uri, registry_uri=self._tracking_uri)

    def get_version(self, name: str, version: str) -> ModelVersionInfo:
        what = f"model '{name}' version {version}"
        try:
            mv = self._client().get_model_version(name, version)
        except Exception as exc:
            raise translate_mlflow_error(exc, what) from exc
        return _version_info(mv)

    def download(self, name: str, version: str, dest: Path) -> ModelPackage:
        """Download the version's artifacts, from an allowed location only (mlflow/sources.py).

        `models:/` and `runs:/` URIs are resolved here, through the tracking server, to the
        location MLflow would fetch from; that location is checked before the first request
        to it, and the download is made from it alone.
        """
        from mlflow.artifacts import download_artifacts

        what = f"downloading model '{name}' version {version}"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            # Resolve through the client: MLflow's own resolution of models:/ URIs ignores the
            # registry_uri and falls back to the process-global (default: local) registry.
            client = self._client()
            uri = _concrete_uri(client, client.get_model_version_download_uri(name, version))
        except MlflowDockError:
            raise
        except Exception as exc:
            raise translate_mlflow_error(exc, what) from exc
        self._allowed.check(uri)
        in_place = self._in_place(uri)
        if in_place is not None:
            return dataclasses.replace(read_package(in_place), in_place=True)
        try:
            local = download_artifacts(
                artifact_uri=uri, dst_path=str(dest), tracking_uri=self._tracking_uri
            )
        except Exception as exc:
            raise translate_mlflow_error(exc, what) from exc
        return read_package(Path(local))

    def _in_place(self, uri: str) -> Path | None:
        """The version's directory in the artifact store, if this service can read it there.

        A gigabyte of weights then costs one read (the hash) instead of a download through the
        tracking server (about 170 MB/s here, ~6 s per GiB) and a copy. The path comes from the
        author's URI: it is used only if it resolves (symlinks included) inside the operator's
        directory; anything else, or a directory not (yet) there, is downloaded as usual.
        """
        if self._destination is None:
            return None
        relative = self._allowed.proxied_path(uri)
        if relative is None:
            return None
        root = self._destination.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_dir():
            return None
        return path

    def update_tags(
        self, name: str, version: str, set_tags: dict[str, str], delete_tags: tuple[str, ...]
    ) -> None:
        from mlflow.exceptions import MlflowException

        """Delete ``delete_tags``, then set ``set_tags`` in their order, one call each (MLflow has
        no batch for version tags): stale tags are gone before any new value is visible."""
        what = f"writing tags of '{name}' version {version}"
        client = self._client()
        try:
            for key in delete_tags:
                try:
                    client.delete_model_version_tag(name, version, key)
                except MlflowException as exc:
                    # Deleting a tag that is not there is the outcome we wanted.
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
            for key, value in set_tags.items():
                client.set_model_version_tag(name, version, key, value)
        except Exception as exc:
            raise translate_mlflow_error(exc, what) from exc

    def list_versions(self, name: str | None = None) -> list[ModelVersionInfo]:
        what = "listing model versions" + (f" of '{name}'" if name else "")
        filter_string = _name_filter(name) if name else None
        try:
            client = self._client()
            out: list[ModelVersionInfo] = []
            token = None
            while True:
                page = client.search_model_versions(filter_string, page_token=token)
                out.extend(_version_info(mv) for mv in page)
                token = page.token
                if not token:
                    return [v for v in out if name is None or v.name == name]
        except Exception as exc:
            raise translate_mlflow_error(exc, what) from exc

    def list_aliases(self, name: str | None = None) -> list[tuple[str, str, str]]:
        """(model, alias, version) for every alias currently set."""
        what = "listing aliases" + (f" of '{name}'" if name else "")
        try:
            client = self._client()
            if name:
                models = [client.get_registered_model(name)]
            else:
                models, token = [], None
                while True:
                    page = client.search_registered_models(page_token=token)
                    models.extend(page)
                    token = page.token
                    if not token:
                        break
        except Exception as exc:
            raise translate_mlflow_error(exc, what) from exc
        return [
            (model.name, alias, str(version))
            for model in models
            for alias, version in sorted((model.aliases or {}).items())
        ]


def _concrete_uri(client: Any, uri: str) -> str:
    """The location `uri` stands for: `models:/` and `runs:/` resolved as MLflow resolves them.

    MLflow's own repositories for these schemes resolve and fetch in one go (and a `runs:/`
    download also fetches the run's logged model from wherever that lives), so nothing could
    be checked between the two; resolving here makes the fetched location the checked one.
    """
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    for _ in range(_MAX_RESOLUTIONS):
        parsed = urlsplit(uri)
        scheme = parsed.scheme.lower()
        if scheme not in ("models", "runs"):
            return uri
        if parsed.netloc:
            # models://profile@databricks/...: another workspace's registry.
            raise SourceNotAllowed(
                f"model artifacts at '{scheme}://{parsed.netloc}/...' are not downloaded: "
                "only this tracking server's models:/ and runs:/ URIs are resolved"
            )
        if scheme == "models":
            base, path = ModelsArtifactRepository.split_models_uri(uri)  # type: ignore[no-untyped-call]
            found = get_model_name_and_version(client, base)  # type: ignore[no-untyped-call]
            if len(found) == 1:
                underlying = client.get_logged_model(found[0]).artifact_location
            else:
                underlying = client.get_model_version_download_uri(*found)
        else:
            run_id, path = RunsArtifactRepository.parse_runs_uri(uri)  # type: ignore[no-untyped-call]
            underlying, path = _run_artifacts(client, run_id, path or "")
        uri = _joined(underlying, path)
    raise SourceNotAllowed(
        f"model artifacts are not downloaded: more than {_MAX_RESOLUTIONS} models:/ or runs:/ "
        "indirections"
    )


def _run_artifacts(client: Any, run_id: str, path: str) -> tuple[str, str]:
    """(location, path in it) of `runs:/<run_id>/<path>`, as MLflow 3 downloads it.

    MLflow 3 keeps a model logged in a run as a logged model of its own; `runs:/<id>/<name>`
    then means that model's artifacts (MLflow's RunsArtifactRepository prefers them over the
    run's own files of the same name). Otherwise: the run's artifact location.
    """
    run = client.get_run(run_id)
    name, _, rest = path.partition("/")
    # MLflow's filter syntax has no escapes: a name with quotes cannot be a logged model's.
    if name and "'" not in name and '"' not in name:
        token = None
        while True:
            page = client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"name = '{name}'",
                page_token=token,
            )
            for model in page:
                if model.source_run_id == run_id:
                    return str(model.artifact_location), rest
            token = page.token
            if not token:
                break
    return str(run.info.artifact_uri), path


def _joined(location: str, path: str) -> str:
    return posixpath.join(location.rstrip("/"), path) if path else location


def _name_filter(name: str) -> str | None:
    """A search filter for one model name, or None when only client-side filtering is safe.

    MLflow's filter parser has no escape sequences; it accepts either quote character, so use
    the one the name does not contain.
    """
    for quote in ("'", '"'):
        if quote not in name:
            return f"name = {quote}{name}{quote}"
    return None


def _version_info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        source=mv.source,
        run_id=mv.run_id,
        status=str(mv.status) if mv.status is not None else None,
        created_ms=mv.creation_timestamp,
    )


def read_package(path: Path) -> ModelPackage:
    """Read MLmodel, python_env.yaml and requirements.txt; PermanentError if unusable.

    Every file is read from inside the model directory only: paths MLmodel names (its pyfunc
    `env` files, `serving_input_path`) are the model author's, and a `..`, an absolute path or
    a symlink out of the directory fails the version instead of reading the worker's files.
    """
    root = path.resolve()
    mlmodel = _yaml_mapping(_inside(root, "MLmodel", "MLmodel"), "MLmodel")
    if mlmodel is None:
        raise PermanentError("model artifacts have no MLmodel file; is this an MLflow model?")
    flavors = mlmodel.get("flavors") or {}
    if not isinstance(flavors, dict):
        raise PermanentError("MLmodel 'flavors' is not a mapping")
    pyfunc = flavors.get("python_function")
    if not pyfunc or not isinstance(pyfunc, dict):
        raise PermanentError(
            "model has no python_function flavor, so it cannot be served; "
            f"flavors: {', '.join(sorted(map(str, flavors))) or 'none'}"
        )
    python_env_name, conda_name = _env_files(pyfunc.get("env"))
    python_env = _yaml_mapping(_inside(root, python_env_name, "the python_env file"), "python_env")
    if python_env is not None:
        _check_python_env(python_env)
    python_version = _python_version(python_env, pyfunc)
    requirements_path = _inside(root, "requirements.txt", "requirements.txt")
    if requirements_path.is_file():
        requirements = requirements_path.read_text()
    else:
        # Models logged before MLflow 1.26 may have only conda.yaml: its pip section is what
        # MLflow itself installs for them (other conda packages are ignored, as MLflow does).
        conda = _yaml_mapping(_inside(root, conda_name, "the conda file"), "conda")
        requirements = _conda_pip_requirements(conda) if conda is not None else ""
    if not requirements.strip() and mlmodel.get("mlflow_version"):
        requirements = f"mlflow=={mlmodel['mlflow_version']}\n"
    example_info = mlmodel.get("saved_input_example_info") or {}
    serving_example = (
        example_info.get("serving_input_path") if isinstance(example_info, dict) else None
    ) or "serving_input_example.json"
    example_path = _inside(root, serving_example, "serving_input_path")
    has_example = example_path.is_file()
    if has_example:
        try:
            json.loads(example_path.read_text())
        except (OSError, ValueError, RecursionError):
            has_example = False
    return ModelPackage(
        path=path,
        python_version=python_version,
        requirements=requirements,
        has_serving_example=has_example,
    )


def _inside(root: Path, name: object, what: str) -> Path:
    """`root/name`, resolved, if it stays inside `root` (`root` itself resolved)."""
    text = name if isinstance(name, str) else ""
    relative = PurePosixPath(text)
    if (
        not text
        or "\x00" in text
        or relative.is_absolute()
        or text.startswith("\\")
        or ".." in relative.parts
    ):
        raise PermanentError(
            f"MLmodel names {what} {_shown(name)}, which is not a path inside the model directory"
        )
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise PermanentError(
            f"{what} {_shown(name)} leads outside the model directory (a symlink); not read"
        )
    return resolved


def _shown(value: object) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return f"'{text[:80]}'"


def _yaml_mapping(path: Path, what: str) -> dict[str, Any] | None:
    """The YAML mapping in `path`, None if there is no such file; PermanentError if unusable."""
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PermanentError(f"{what} is not valid YAML: {exc}") from None
    except RecursionError:
        raise PermanentError(f"{what} is nested too deeply to read") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PermanentError(f"{what} is not a YAML mapping")
    return loaded


def _env_files(env: object) -> tuple[object, object]:
    """(python_env file, conda file) the pyfunc flavor's `env` names, with MLflow's defaults."""
    if isinstance(env, dict):
        return env.get("virtualenv", "python_env.yaml"), env.get("conda", "conda.yaml")
    if env is None:
        return "python_env.yaml", "conda.yaml"
    # MLflow < 2.0 wrote `env: conda.yaml`.
    return "python_env.yaml", env


def _check_python_env(python_env: dict[str, Any]) -> None:
    """python_env.yaml may name packages and `-r requirements.txt`, nothing else.

    MLflow's stock builder (MLFLOW_DOCK_BUILDER=mlflow) hands every entry to `pip install` as
    arguments, so an entry such as `--index-url http://...` would bypass the requirements
    policy that requirements.txt goes through; MLflow itself writes only these two forms.
    """
    for key in ("build_dependencies", "dependencies"):
        entries = python_env.get(key) or []
        if not isinstance(entries, list):
            raise PermanentError(f"python_env {key} is not a list")
        for entry in entries:
            if key == "dependencies" and entry == "-r requirements.txt":
                continue
            if not _named_requirement(entry):
                raise PermanentError(
                    f"python_env {key} entry {_shown(entry)} is not allowed: only package "
                    "names (with versions) and '-r requirements.txt' are"
                )


def _named_requirement(entry: object) -> bool:
    if not isinstance(entry, str) or entry.startswith("-") or "${" in entry:
        return False
    try:
        return Requirement(entry).url is None
    except InvalidRequirement:
        return False


def _conda_pip_requirements(conda: dict[str, Any]) -> str:
    lines: list[str] = []
    for dependency in conda.get("dependencies") or []:
        if isinstance(dependency, dict) and isinstance(dependency.get("pip"), list):
            lines.extend(str(entry) for entry in dependency["pip"])
    return "".join(f"{line}\n" for line in lines)


def _python_version(python_env: dict[str, Any] | None, pyfunc: dict[str, Any]) -> str:
    full = (python_env or {}).get("python")
    full = str(full or pyfunc.get("python_version") or "3.11")
    parts = full.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise PermanentError(f"cannot tell the model's Python version from {_shown(full)}")
    return f"{parts[0]}.{parts[1]}"
