"""Tests for mlflow_dock.oci.reference: go-containerregistry-style tables, then properties."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlflow_dock.errors import ConfigError
from mlflow_dock.oci.reference import (
    ImageRef,
    alias_tag,
    default_namespace,
    image_repository,
    is_digest,
    modelcar_tag,
    pinned,
    registry_hostname,
    repository_name,
    service_repository,
    split_host,
    split_registry,
    version_tag,
)

# The grammar straight from the OCI distribution spec, written out again on purpose so a typo
# in the module's constants cannot make these tests agree with it.
COMPONENT = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
HASHED = re.compile(r".*-[0-9a-f]{10}")

DIGEST = "sha256:" + "ab" * 32


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# --- repository_name ---------------------------------------------------------------------------

# Names that are already valid repository components are kept as they are.
GOOD_UNCHANGED_NAMES = [
    "fraud-model",
    "iris",
    "a",
    "0",
    "model",
    "resnet50",
    "bert-base-uncased",
    "x" * 100,
    "abc-0123456789a",  # 11 hex digits after the dash: not the hash-suffix pattern
    "abc-012345678",  # 9 hex digits
]

# (model name, expected stem); all of them get a hash suffix.
HASHED_NAMES = [
    ("Iris Classifier", "iris-classifier"),
    ("Fraud Model", "fraud-model"),
    ("team/fraud v2", "team-fraud-v2"),
    ("Modèle", "modele"),
    ("Crème Brûlée", "creme-brulee"),
    (
        "\uff26\uff35\uff2c\uff2c \uff57\uff49\uff44\uff54\uff48",
        "full-width",
    ),  # fullwidth "FULL width": NFKD folds it
    ("ﬁne", "fine"),  # ligature
    ("my_model.v1", "my-model-v1"),  # "_" and "." are valid but folded for one simple rule
    ("a__b", "a-b"),
    ("a--b", "a-b"),
    ("--leading", "leading"),
    ("trailing--", "trailing"),
    ("  spaced  out  ", "spaced-out"),
    ("UPPER", "upper"),
    ("模型", "model"),
    ("!!!", "model"),
    ("-", "model"),
    ("", "model"),
    ("İstanbul", "istanbul"),
    ("fraud-model-0123456789", "fraud-model-0123456789"),  # looks like one of ours
    ("abcdef0123-abcdef0123", "abcdef0123-abcdef0123"),
    ("x" * 101, "x" * 100),
    ("abc-" * 50, ("abc-" * 25).rstrip("-")),  # the cut must not leave a trailing "-"
]


@pytest.mark.parametrize("name", GOOD_UNCHANGED_NAMES)
def test_valid_names_are_kept(name: str) -> None:
    assert repository_name(name) == name


@pytest.mark.parametrize(("name", "stem"), HASHED_NAMES)
def test_other_names_get_stem_and_hash(name: str, stem: str) -> None:
    result = repository_name(name)
    assert result == f"{stem}-{h(name)}"
    assert COMPONENT.fullmatch(result)


def test_readme_examples() -> None:
    assert repository_name("fraud-model") == "fraud-model"
    assert repository_name("Fraud Model") == f"fraud-model-{h('Fraud Model')}"
    assert repository_name("Iris Classifier").startswith("iris-classifier-")
    assert repository_name("Fraud Model") != repository_name("fraud-model")


def test_names_mimicking_a_hashed_name_do_not_collide() -> None:
    hashed = repository_name("Fraud Model")
    # Someone names a model exactly like the repository of another one.
    assert repository_name(hashed) != hashed
    assert repository_name(hashed) != repository_name("Fraud Model")


def test_case_and_spacing_variants_are_distinct() -> None:
    names = [
        "fraud model",
        "Fraud Model",
        "FRAUD MODEL",
        "fraud  model",
        "fraud_model",
        "fraud-model",
    ]
    assert len({repository_name(n) for n in names}) == len(names)


def test_long_names_are_capped() -> None:
    for name in ["x" * 1000, "Very Long Name " * 100, "é" * 500, "a-" * 400]:
        result = repository_name(name)
        assert len(result) <= 100 + 11
        assert COMPONENT.fullmatch(result)


def test_lone_surrogate_does_not_crash() -> None:
    result = repository_name("model\ud800")
    assert COMPONENT.fullmatch(result)
    assert result != repository_name("model\ud801")


def test_stable_across_processes() -> None:
    # Guards against anyone switching to hash(), which is salted per process.
    code = "from mlflow_dock.oci.reference import repository_name as r; print(r('Iris Classifier'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == repository_name("Iris Classifier") == f"iris-classifier-{h('Iris Classifier')}"


# --- version_tag -------------------------------------------------------------------------------

GOOD_VERSIONS = [
    ("1", "1"),
    (1, "1"),
    ("42", "42"),
    (42, "42"),
    ("007", "7"),
    ("9" * 128, "9" * 128),
]
BAD_VERSIONS = [
    "",
    "0",
    0,
    -1,
    "-1",
    "+1",
    " 1",
    "1 ",
    "1.0",
    "v1",
    "latest",
    "\u0661",  # Arabic-Indic digit one: str.isdigit() would say yes
    "1_000",
    "9" * 129,
    "1" * 5000,
    10**200,
    True,
    1.0,
    None,
]


@pytest.mark.parametrize(("version", "tag"), GOOD_VERSIONS)
def test_version_tag_good(version: str | int, tag: str) -> None:
    assert version_tag(version) == tag


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_version_tag_bad(version: object) -> None:
    with pytest.raises(ValueError):
        version_tag(version)  # type: ignore[arg-type]


# --- alias_tag ---------------------------------------------------------------------------------

GOOD_UNCHANGED_ALIASES = [
    "champion",
    "Champion",
    "challenger",
    "prod_v2",
    "_private",
    "a.b-c_d",
    "v1",
    "1a",
    "alias-5",  # the stem of alias "5", but "5" gets a hash so no collision
    "x" * 128,
    "x-ABCDEF0123",
]

# (alias, expected stem); all of them get a hash suffix.
HASHED_ALIASES = [
    ("5", "alias-5"),
    ("007", "alias-007"),
    ("champion-0123456789", "champion-0123456789"),
    ("my alias", "my-alias"),
    ("café", "cafe"),
    ("-dash", "dash"),
    (".dot", "dot"),
    ("-", "alias"),
    ("", "alias"),
    ("别名", "alias"),
    ("prod/eu", "prod-eu"),
    ("x" * 129, "x" * 117),
    ("a." * 100, ("a." * 100)[:117].rstrip(".-")),
]


@pytest.mark.parametrize("alias", GOOD_UNCHANGED_ALIASES)
def test_valid_aliases_are_kept(alias: str) -> None:
    assert alias_tag(alias) == alias


@pytest.mark.parametrize(("alias", "stem"), HASHED_ALIASES)
def test_other_aliases_get_stem_and_hash(alias: str, stem: str) -> None:
    result = alias_tag(alias)
    assert result == f"{stem}-{h(alias)}"
    assert TAG.fullmatch(result)


def test_digit_alias_never_looks_like_a_version() -> None:
    assert alias_tag("5") != version_tag("5")
    assert alias_tag("5") != alias_tag("alias-5")
    assert not alias_tag("5").isdigit()


def test_aliases_keep_case() -> None:
    assert alias_tag("Champion") != alias_tag("champion")


# --- split_registry / default_namespace --------------------------------------------------------

SPLITS = [
    ("us-central1-docker.pkg.dev/proj/repo", ("us-central1-docker.pkg.dev", "proj/repo")),
    ("docker.io", ("docker.io", "")),
    ("127.0.0.1:5000", ("127.0.0.1:5000", "")),
    ("localhost:5000/", ("localhost:5000", "")),
    ("https://registry.example.com:5000/", ("registry.example.com:5000", "")),
    ("http://localhost:5000/team//", ("localhost:5000", "team")),
    ("HTTPS://ghcr.io/my-org", ("ghcr.io", "my-org")),
    ("  ghcr.io  ", ("ghcr.io", "")),
    ("[::1]:5000/a", ("[::1]:5000", "a")),
    (
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        ("123456789012.dkr.ecr.eu-west-1.amazonaws.com", ""),
    ),
]


@pytest.mark.parametrize(("registry", "expected"), SPLITS)
def test_split_registry(registry: str, expected: tuple[str, str]) -> None:
    assert split_registry(registry) == expected


NAMESPACES = [
    ("docker.io", "alice", "alice"),
    ("index.docker.io", "alice", "alice"),
    ("registry-1.docker.io", "alice", "alice"),
    ("https://docker.io/", "Alice", "alice"),
    ("ghcr.io", "Octo-Cat", "octo-cat"),
    ("GHCR.IO", "octocat", "octocat"),
    ("ghcr.io", "weird_name.", "weird-name"),
    ("ghcr.io/my-org", "octocat", ""),  # the owner is already in the registry setting
    ("docker.io/myorg", "alice", ""),
    ("registry.example.com:5000", "alice", ""),
    ("localhost:5000", "", ""),
    ("quay.io", "alice", ""),
    ("us-central1-docker.pkg.dev/proj/repo", "alice", ""),
]


@pytest.mark.parametrize(("registry", "username", "expected"), NAMESPACES)
def test_default_namespace(registry: str, username: str, expected: str) -> None:
    result = default_namespace(registry, username)
    assert result == expected
    if result:
        assert COMPONENT.fullmatch(result)


@pytest.mark.parametrize("username", ["", "   ", "@@@", "模型"])
@pytest.mark.parametrize("registry", ["docker.io", "ghcr.io"])
def test_default_namespace_needs_a_username(registry: str, username: str) -> None:
    with pytest.raises(ConfigError):
        default_namespace(registry, username)


# --- image_repository --------------------------------------------------------------------------

GOOD_REPOSITORIES = [
    (
        "registry.example.com:5000",
        "team",
        "fraud-model",
        "registry.example.com:5000/team/fraud-model",
    ),
    ("localhost:5000", "", "fraud-model", "localhost:5000/fraud-model"),
    ("https://localhost:5000/", "", "iris", "localhost:5000/iris"),
    ("127.0.0.1:5000", "a/b/c", "iris", "127.0.0.1:5000/a/b/c/iris"),
    (
        "us-central1-docker.pkg.dev/proj/repo",
        "",
        "iris",
        "us-central1-docker.pkg.dev/proj/repo/iris",
    ),
    (
        "us-central1-docker.pkg.dev/proj/repo",
        "team",
        "iris",
        "us-central1-docker.pkg.dev/proj/repo/team/iris",
    ),
    ("docker.io", "alice", "iris", "docker.io/alice/iris"),
    ("ghcr.io/my-org", "", "iris", "ghcr.io/my-org/iris"),
    ("[::1]:5000", "", "iris", "[::1]:5000/iris"),
    ("reg", "a.b_c__d---e", "iris", "reg/a.b_c__d---e/iris"),
    (
        "localhost:5000",
        "team",
        "Iris Classifier",
        f"localhost:5000/team/iris-classifier-{h('Iris Classifier')}",
    ),
]


@pytest.mark.parametrize(("registry", "namespace", "model", "expected"), GOOD_REPOSITORIES)
def test_image_repository_good(registry: str, namespace: str, model: str, expected: str) -> None:
    assert image_repository(registry, namespace, model) == expected
    assert str(ImageRef(expected, "1")) == f"{expected}:1"


BAD_REPOSITORIES = [
    ("", "", "iris"),  # no host
    ("https://", "", "iris"),
    ("-bad.example.com", "", "iris"),
    ("bad_host.example.com", "", "iris"),
    ("localhost:port", "", "iris"),
    ("localhost:5000/Upper", "", "iris"),
    ("localhost:5000/a//b", "", "iris"),
    ("localhost:5000", "Team", "iris"),
    ("localhost:5000", "team/", "iris"),
    ("localhost:5000", "/team", "iris"),
    ("localhost:5000", "a//b", "iris"),
    ("localhost:5000", "-team", "iris"),
    ("localhost:5000", "team-", "iris"),
    ("localhost:5000", "te am", "iris"),
    ("localhost:5000", "a...b", "iris"),
    ("localhost:5000", "a___b", "iris"),
    ("docker.io", "", "iris"),  # would push to the official library namespace
    ("ghcr.io", "", "iris"),
    ("localhost:5000", "a" * 250, "iris"),  # too long in total
    ("localhost:5000/" + "p" * 200, "n" * 40, "iris"),
]


@pytest.mark.parametrize(("registry", "namespace", "model"), BAD_REPOSITORIES)
def test_image_repository_bad(registry: str, namespace: str, model: str) -> None:
    with pytest.raises(ConfigError):
        image_repository(registry, namespace, model)


def test_image_repository_limit_is_inclusive() -> None:
    host = "localhost:5000"
    model = "iris"
    namespace = "n" * (255 - len(host) - len(model) - 2)
    assert len(image_repository(host, namespace, model)) == 255
    with pytest.raises(ConfigError):
        image_repository(host, namespace + "n", model)


# --- ImageRef ----------------------------------------------------------------------------------


def test_image_ref_str_forms() -> None:
    repo = "localhost:5000/team/iris"
    assert str(ImageRef(repo)) == repo
    assert str(ImageRef(repo, tag="3")) == f"{repo}:3"
    assert str(ImageRef(repo, digest=DIGEST)) == f"{repo}@{DIGEST}"
    assert str(ImageRef(repo, tag="3", digest=DIGEST)) == f"{repo}:3@{DIGEST}"


def test_image_ref_parts_and_copies() -> None:
    ref = ImageRef("localhost:5000/team/iris", tag="3")
    assert ref.host == "localhost:5000"
    assert ref.path == "team/iris"
    moved = ref.with_tag("champion").with_digest(DIGEST)
    assert moved == ImageRef("localhost:5000/team/iris", "champion", DIGEST)
    assert ref.tag == "3"  # frozen: the original is unchanged
    with pytest.raises(AttributeError):
        ref.tag = "4"  # type: ignore[misc]
    assert hash(ref) == hash(ImageRef("localhost:5000/team/iris", tag="3"))


@pytest.mark.parametrize(
    ("repository", "tag", "digest"),
    [
        ("iris", None, None),  # no host
        ("localhost:5000/", None, None),
        ("localhost:5000/Iris", None, None),
        ("localhost:5000/" + "a" * 241, None, None),  # 256 characters
        ("localhost:5000/iris", "", None),
        ("localhost:5000/iris", ".tag", None),
        ("localhost:5000/iris", "-tag", None),
        ("localhost:5000/iris", "a" * 129, None),
        ("localhost:5000/iris", "a:b", None),
        ("localhost:5000/iris", None, "sha256:abc"),
        ("localhost:5000/iris", None, "sha256:" + "AB" * 32),
        ("localhost:5000/iris", None, "sha512:" + "ab" * 32),
        ("localhost:5000/iris", None, "ab" * 32),
    ],
)
def test_image_ref_rejects_invalid_parts(
    repository: str, tag: str | None, digest: str | None
) -> None:
    with pytest.raises(ValueError):
        ImageRef(repository, tag, digest)


def test_image_ref_with_tag_validates() -> None:
    ref = ImageRef("localhost:5000/iris")
    with pytest.raises(ValueError):
        ref.with_tag("bad tag")
    with pytest.raises(ValueError):
        ref.with_digest("sha256:nope")


# --- properties --------------------------------------------------------------------------------

names = st.text(min_size=1)


@given(names)
def test_repository_name_is_a_component(name: str) -> None:
    result = repository_name(name)
    assert COMPONENT.fullmatch(result)
    assert len(image_repository("registry.example.com:5000", "team", name)) <= 255


@given(names)
def test_repository_name_keeps_or_hashes(name: str) -> None:
    result = repository_name(name)
    assert result == name or (HASHED.fullmatch(result) and result.endswith(h(name)))


@given(st.lists(st.text(min_size=1), unique=True, min_size=2))
def test_repository_names_never_collide(name_list: list[str]) -> None:
    results = [repository_name(n) for n in name_list]
    assert len(set(results)) == len(results)


@given(st.lists(st.from_regex(COMPONENT, fullmatch=True), unique=True, min_size=2))
def test_repository_names_never_collide_near_the_grammar(name_list: list[str]) -> None:
    # Arbitrary text rarely hits the interesting case: names that are almost kept unchanged.
    candidates = name_list + [repository_name(n) for n in name_list]
    candidates = list(dict.fromkeys(candidates))
    results = [repository_name(n) for n in candidates]
    assert len(set(results)) == len(results)


@given(names)
def test_repository_name_is_deterministic(name: str) -> None:
    assert repository_name(name) == repository_name(name)


@given(st.text())
def test_alias_tag_is_a_tag(alias: str) -> None:
    result = alias_tag(alias)
    assert TAG.fullmatch(result)
    assert alias_tag(alias) == result


@given(st.lists(st.text(), unique=True, min_size=2))
def test_alias_tags_never_collide(alias_list: list[str]) -> None:
    results = [alias_tag(a) for a in alias_list]
    assert len(set(results)) == len(results)


@given(st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), unique=True, min_size=2))
def test_alias_tags_never_collide_near_the_grammar(alias_list: list[str]) -> None:
    candidates = list(dict.fromkeys(alias_list + [alias_tag(a) for a in alias_list]))
    results = [alias_tag(a) for a in candidates]
    assert len(set(results)) == len(results)


@given(st.text(), st.integers(min_value=1, max_value=10**30))
def test_alias_tag_never_equals_a_version_tag(alias: str, version: int) -> None:
    assert alias_tag(alias) != version_tag(version)
    assert alias_tag(str(version)) != version_tag(version)
    assert not alias_tag(alias).isdigit()


@given(st.integers(min_value=1, max_value=10**127 - 1))
def test_version_tag_round_trips(version: int) -> None:
    tag = version_tag(str(version))
    assert TAG.fullmatch(tag)
    assert int(tag) == version
    assert version_tag(version) == tag


# --------------------------------------------------------------------------- hosts, digests, parse


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("[::1]:5000", ("::1", 5000)),
        ("::1", ("::1", None)),
        ("h:80", ("h", 80)),
        ("ghcr.io", ("ghcr.io", None)),
    ],
)
def test_split_host(host, expected):
    assert split_host(host) == expected


@pytest.mark.parametrize("host", ["[::1", "h:port", ":5000", "[::1]x"])
def test_split_host_refuses(host):
    with pytest.raises(ValueError):
        split_host(host)


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ("https://123.dkr.ecr.eu-west-1.amazonaws.com/", "123.dkr.ecr.eu-west-1.amazonaws.com"),
        ("Europe-Docker.pkg.dev/proj/repo", "europe-docker.pkg.dev"),
        ("127.0.0.1:5000", "127.0.0.1"),
        ("[::1]:5000/team", "::1"),
    ],
)
def test_registry_hostname(registry, expected):
    assert registry_hostname(registry) == expected


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (DIGEST, True),
        ("sha512:" + "a" * 128, True),
        ("sha256:" + "A" * 64, False),
        ("sha256:abc", False),
        ("sha256:", False),
        ("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8", True),
        ("latest", False),
    ],
)
def test_is_digest(value, ok):
    assert is_digest(value) is ok


@pytest.mark.parametrize(
    ("text", "repository", "tag", "digest"),
    [
        ("127.0.0.1:5000/team/m:3", "127.0.0.1:5000/team/m", "3", None),
        ("127.0.0.1:5000/team/m", "127.0.0.1:5000/team/m", None, None),
        (f"ghcr.io/o/m@{DIGEST}", "ghcr.io/o/m", None, DIGEST),
        (f"ghcr.io/o/m:champion@{DIGEST}", "ghcr.io/o/m", "champion", DIGEST),
    ],
)
def test_parse_round_trips(text, repository, tag, digest):
    ref = ImageRef.parse(text)
    assert (ref.repository, ref.tag, ref.digest) == (repository, tag, digest)
    assert str(ref) == text


def test_pinned_drops_the_tag_and_keeps_the_port():
    assert pinned("127.0.0.1:5000/team/m:3", DIGEST) == f"127.0.0.1:5000/team/m@{DIGEST}"


# --- names the service owns -------------------------------------------------------------------

SERVICE_REPOSITORIES = ("mlflow-dock-base", "mlflow-dock-cache", "mlflow-dock-staging")


@pytest.mark.parametrize("name", ["mlflow-dock-base", "mlflow-dock", "mlflow-dock-cache-x"])
def test_a_model_named_like_a_service_repository_is_hashed(name: str) -> None:
    assert repository_name(name) == f"{name}-{h(name)}"


def test_service_repositories_are_only_the_reserved_names() -> None:
    assert service_repository("r.io", "team", "mlflow-dock-base") == "r.io/team/mlflow-dock-base"
    for refused in ("fraud-model", "mlflow-dock-base-0123456789"):
        with pytest.raises(ValueError, match="reserved"):
            service_repository("r.io", "team", refused)


@given(names)
def test_no_model_name_maps_onto_a_service_repository(name: str) -> None:
    assert repository_name(name) not in SERVICE_REPOSITORIES


@given(st.sampled_from(SERVICE_REPOSITORIES), st.text(max_size=8))
def test_no_near_service_name_maps_onto_a_service_repository(service: str, extra: str) -> None:
    assert repository_name(service + extra) not in SERVICE_REPOSITORIES


@pytest.mark.parametrize(
    "alias",
    [
        "sha256-" + "a" * 64,  # the OCI referrers fallback tag of a digest
        "sha256-" + "a" * 64 + ".sig",
        "sha256-" + "a" * 64 + ".att",
        "sha256-" + "a" * 64 + ".sbom",
        "SHA256-abc",
        "3-modelcar",
        "champion-modelcar",
    ],
)
def test_an_alias_named_like_a_tag_the_service_writes_is_hashed(alias: str) -> None:
    tag = alias_tag(alias)
    assert tag != alias and tag.endswith(h(alias))
    assert not tag.lower().startswith("sha256-") and not tag.endswith("-modelcar")


@given(st.text())
def test_no_alias_tag_looks_like_an_attachment_or_modelcar_tag(alias: str) -> None:
    tag = alias_tag(alias)
    assert not tag.lower().startswith("sha256-") and not tag.lower().endswith("-modelcar")


@given(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", fullmatch=True))
def test_modelcar_tags_are_tags_and_never_alias_tags(tag: str) -> None:
    result = modelcar_tag(tag)
    assert TAG.fullmatch(result) and result.endswith("-modelcar")
    assert all(alias_tag(a) != result for a in (result, tag))


def test_modelcar_tags_of_long_tags_stay_distinct() -> None:
    a, b = "x" * 127 + "a", "x" * 127 + "b"
    assert modelcar_tag(a) != modelcar_tag(b) and len(modelcar_tag(a)) == 128
    assert modelcar_tag("3") == "3-modelcar"
