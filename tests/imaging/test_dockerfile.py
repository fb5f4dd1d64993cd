from __future__ import annotations

from mlflow_dock.imaging.dockerfile import (
    ImageSpec,
    PipOptions,
    image_labels,
    render_model_dockerfile,
    render_runtime_dockerfile,
    requirement_name,
    runtime_key,
    serving_context_files,
    serving_requirements,
    system_packages_for,
)

REQS = "mlflow==3.17.2\nnumpy==2.4.6\npandas==3.1.1\nscikit-learn==1.9.1\n"


def spec(**kw) -> ImageSpec:
    return ImageSpec(base_image="python:3.11-slim", requirements=REQS, **kw)


def render_dockerfile(s: ImageSpec) -> str:
    return render_runtime_dockerfile(s)


def test_layers_go_from_least_to_most_volatile():
    text = render_dockerfile(spec())
    order = [
        text.index("FROM python:3.11-slim AS runtime"),
        text.index("COPY requirements.txt"),
        text.index("pip install"),
        text.index("COPY --from=deps"),
    ]
    assert order == sorted(order)
    assert "model/" not in text


def test_model_is_the_only_layer_on_top_of_the_runtime():
    text = render_model_dockerfile("mlflow-dock-runtime:abc")
    assert text.splitlines() == ["FROM mlflow-dock-runtime:abc", "COPY model/ /opt/ml/model/"]


def test_runtime_key_changes_with_every_input():
    base = runtime_key(spec(), ca_bundle=None)
    assert base == runtime_key(spec(), ca_bundle=None)
    assert base != runtime_key(spec(), ca_bundle=b"cert")
    assert base != runtime_key(ImageSpec(base_image="other", requirements=REQS), ca_bundle=None)
    assert base != runtime_key(
        ImageSpec(base_image="python:3.11-slim", requirements=REQS + "x\n"), ca_bundle=None
    )
    assert base != runtime_key(spec(pip=PipOptions(index_url="https://i/simple")), ca_bundle=None)


def test_image_hygiene():
    text = render_dockerfile(spec())
    final_stage = text.split("FROM runtime\n", 1)[1]
    assert "USER 10001:10001" in final_stage
    assert "EXPOSE 8080" in final_stage
    assert "HEALTHCHECK" in final_stage and "/ping" in final_stage
    assert "--no-cache-dir" in text
    assert "nginx" not in text
    # mlflow-dock's server (MLflow's protocol and V2) reads $PORT itself: no shell needed.
    assert 'CMD ["python", "-m", "mlflow_dock_serving"]' in final_stage
    assert "PYTHONPATH=/opt/mlflow-dock/serving" in final_stage


def test_the_runtime_copies_the_model_server_from_the_context():
    files = {"opt/mlflow-dock/serving/mlflow_dock_serving/__init__.py": b"# server\n"}
    s = spec(serving_files=files)
    text = render_dockerfile(s)
    final_stage = text.split("FROM runtime\n", 1)[1]
    assert "COPY serving/ /opt/mlflow-dock/serving/" in final_stage
    assert serving_context_files(s) == {"serving/mlflow_dock_serving/__init__.py": b"# server\n"}
    # Another server is another runtime, so no version is assembled on a stale one.
    assert runtime_key(s, ca_bundle=None) != runtime_key(
        spec(serving_files={**files, "opt/mlflow-dock/serving/x.py": b""}), ca_bundle=None
    )
    assert runtime_key(s, ca_bundle=None) == runtime_key(spec(serving_files=files), ca_bundle=None)


def test_the_version_s_v2_name_follows_the_model_and_precedes_the_labels():
    text = render_model_dockerfile(
        "rt:1",
        {"a": "b"},
        {"MLFLOW_DOCK_V2_MODEL_NAME": 'my "$model"', "MLFLOW_DOCK_V2_MODEL_VERSION": "3"},
    )
    assert text.splitlines() == [
        "FROM rt:1",
        "COPY model/ /opt/ml/model/",
        'ENV MLFLOW_DOCK_V2_MODEL_NAME="my \\"\\$model\\"" \\',
        '    MLFLOW_DOCK_V2_MODEL_VERSION="3"',
        'LABEL "a"="b"',
    ]


def test_build_inputs_stay_in_the_deps_stage():
    pip = PipOptions(
        index_url="https://user:tok3n@pypi.corp/simple",
        extra_index_urls=("https://x:y@extra/simple",),
        has_ca_bundle=True,
    )
    text = render_dockerfile(spec(pip=pip))
    final_stage = text.split("FROM runtime\n", 1)[1]
    assert "_build" not in final_stage
    assert "mlflow-dock-build" not in final_stage
    # Secrets travel in pip.conf inside the context, never in an instruction.
    assert "tok3n" not in text and "x:y" not in text
    conf = pip.pip_conf()
    assert "index-url = https://user:tok3n@pypi.corp/simple" in conf
    assert "cert = /tmp/mlflow-dock-build/ca-bundle.crt" in conf


def test_only_the_virtualenv_leaves_the_deps_stage_and_no_python_runs_after_the_install():
    text = render_dockerfile(spec(pip=PipOptions(index_url="https://u:t@x/simple")))
    deps, final_stage = text.split("FROM runtime AS deps\n", 1)[1].split("FROM runtime\n", 1)
    copies = [line for line in final_stage.splitlines() if line.startswith(("COPY", "ADD"))]
    # From the deps stage only the virtualenv; from the context only mlflow-dock's own server.
    assert copies == [
        "COPY --from=deps /opt/mlflow-dock/venv /opt/mlflow-dock/venv",
        "COPY serving/ /opt/mlflow-dock/serving/",
    ]
    # A wheel may ship a .pth file, which any later interpreter start in the stage that holds
    # the credentials would run: nothing starts Python after uv has installed the requirements.
    after_install = deps.split("uv pip install", 1)[1]
    assert "python" not in after_install.replace("--python /opt/mlflow-dock/venv/bin/python", "")


def test_dockerfile_is_a_pure_function_of_the_spec():
    assert render_dockerfile(spec()) == render_dockerfile(spec())


def test_system_packages_only_when_needed():
    assert "apt-get" not in render_dockerfile(spec())
    text = render_dockerfile(spec(system_packages=("libgomp1",)))
    assert "apt-get install -y --no-install-recommends libgomp1" in text
    assert "rm -rf /var/lib/apt/lists/*" in text
    assert system_packages_for("lightgbm==4.0\nnumpy\n") == ("libgomp1",)
    assert system_packages_for(REQS) == ()


def test_mlflow_is_swapped_for_skinny_at_the_same_pin():
    out = serving_requirements(REQS)
    assert out.splitlines()[0] == "mlflow-skinny==3.17.2"
    assert "numpy==2.4.6" in out
    assert serving_requirements("mlflow[extras]>=3.0\n").startswith("mlflow-skinny>=3.0")
    assert serving_requirements("numpy\n").startswith("mlflow-skinny\n")
    assert "# comment" not in serving_requirements("numpy # comment\n# only a comment\n")


def test_requirement_names():
    assert requirement_name("Scikit_Learn==1.0") == "scikit-learn"
    assert requirement_name("-r other.txt") is None
    assert requirement_name("  # x") is None


def test_labels():
    labels = image_labels(
        model_name="Iris Classifier",
        version="2",
        run_id="abc",
        source="models:/m-1",
        requirements_digest="f" * 64,
        created="2026-11-26T00:00:00+00:00",
    )
    assert labels["org.opencontainers.image.version"] == "2"
    assert labels["io.mlflow-dock.model.name"] == "Iris Classifier"
    assert labels["io.mlflow-dock.requirements.sha256"] == "f" * 64


def test_uv_in_the_engine_build_gets_the_base_image_pip_settings_and_ca_store():
    from mlflow_dock.imaging.dockerfile import ImageSpec, PipOptions, render_runtime_dockerfile

    text = render_runtime_dockerfile(ImageSpec(base_image="b", requirements="x\n"))
    assert "export UV_NATIVE_TLS=1" in text
    for pip_env, uv_env in (
        ("PIP_CERT", "SSL_CERT_FILE"),
        ("PIP_INDEX_URL", "UV_INDEX_URL"),
        ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"),
        ("PIP_TRUSTED_HOST", "UV_INSECURE_HOST"),
    ):
        assert f"${{{pip_env}:-" in text and f'export {uv_env}="$v"' in text
    # An index mlflow-dock was configured with stays in charge (uv.toml), not the base's.
    ours = render_runtime_dockerfile(
        ImageSpec(base_image="b", requirements="x\n", pip=PipOptions(index_url="https://i"))
    )
    assert "UV_INDEX_URL" not in ours


def test_the_engine_build_installs_wheels_only_unless_sdists_are_allowed():
    text = render_dockerfile(spec())
    lines = text.splitlines()
    install = lines.index(next(line for line in lines if "uv pip install" in line))
    assert "--only-binary :all:" in lines[install + 1]
    assert "only-binary = :all:" in PipOptions().pip_conf()
    relaxed = render_dockerfile(spec(pip=PipOptions(only_binary=False)))
    assert "--only-binary" not in relaxed
    # A different install recipe is a different runtime.
    assert runtime_key(spec(), ca_bundle=None) != runtime_key(
        spec(pip=PipOptions(only_binary=False)), ca_bundle=None
    )
