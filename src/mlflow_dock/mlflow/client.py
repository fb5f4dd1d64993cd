"""Fetching a registered model version from MLflow, with MLflow errors translated in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlflow_dock.errors import PermanentError, RetryableError

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


class MlflowSource:
    def __init__(self, tracking_uri: str) -> None:
        self._tracking_uri = tracking_uri

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
        from mlflow.artifacts import download_artifacts

        what = f"downloading model '{name}' version {version}"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            # Resolve through the client: download_artifacts() ignores its registry_uri for
            # models:/ URIs and falls back to the process-global (default: local) registry.
            uri = self._client().get_model_version_download_uri(name, version)
            local = download_artifacts(
                artifact_uri=uri, dst_path=str(dest), tracking_uri=self._tracking_uri
            )
        except Exception as exc:
            raise translate_mlflow_error(exc, what) from exc
        return read_package(Path(local))

    def update_tags(
        self, name: str, version: str, set_tags: dict[str, str], delete_tags: tuple[str, ...]
    ) -> None:
        from mlflow.exceptions import MlflowException

        what = f"writing tags of '{name}' version {version}"
        client = self._client()
        try:
            for key, value in set_tags.items():
                client.set_model_version_tag(name, version, key, value)
            for key in delete_tags:
                try:
                    client.delete_model_version_tag(name, version, key)
                except MlflowException as exc:
                    # Deleting a tag that is not there is the outcome we wanted.
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
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
    """Read MLmodel, python_env.yaml and requirements.txt; PermanentError if unusable."""
    mlmodel_path = path / "MLmodel"
    if not mlmodel_path.is_file():
        raise PermanentError("model artifacts have no MLmodel file; is this an MLflow model?")
    try:
        mlmodel = yaml.safe_load(mlmodel_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PermanentError(f"MLmodel is not valid YAML: {exc}") from None
    flavors = mlmodel.get("flavors") or {}
    pyfunc = flavors.get("python_function")
    if not pyfunc:
        raise PermanentError(
            "model has no python_function flavor, so it cannot be served; "
            f"flavors: {', '.join(sorted(flavors)) or 'none'}"
        )
    python_version = _python_version(path, pyfunc)
    requirements_path = path / "requirements.txt"
    requirements = requirements_path.read_text() if requirements_path.is_file() else ""
    if not requirements.strip() and mlmodel.get("mlflow_version"):
        requirements = f"mlflow=={mlmodel['mlflow_version']}\n"
    example_info = mlmodel.get("saved_input_example_info") or {}
    serving_example = example_info.get("serving_input_path") or "serving_input_example.json"
    has_example = (path / serving_example).is_file()
    if has_example:
        try:
            json.loads((path / serving_example).read_text())
        except (OSError, ValueError):
            has_example = False
    return ModelPackage(
        path=path,
        python_version=python_version,
        requirements=requirements,
        has_serving_example=has_example,
    )


def _python_version(path: Path, pyfunc: dict[str, Any]) -> str:
    full = None
    env_file = path / "python_env.yaml"
    if env_file.is_file():
        try:
            full = (yaml.safe_load(env_file.read_text()) or {}).get("python")
        except yaml.YAMLError:
            full = None
    full = str(full or pyfunc.get("python_version") or "3.11")
    parts = full.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise PermanentError(f"cannot tell the model's Python version from '{full}'")
    return f"{parts[0]}.{parts[1]}"
