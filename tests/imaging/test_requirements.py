"""The requirements policy: named requirements only, unless the operator opts in."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import InvalidRequirement, Requirement

from mlflow_dock.errors import PermanentError, is_retryable
from mlflow_dock.imaging.requirements import (
    RequirementRefused,
    RequirementsPolicy,
    checked_requirements,
)

DEFAULT = RequirementsPolicy()
DIRECT = RequirementsPolicy(allow_direct_references=True)
EVERYTHING = RequirementsPolicy(allow_direct_references=True, allow_sdists=True)
HASH = "--hash=sha256:" + "ab" * 32


def refused(text: str, policy: RequirementsPolicy = DEFAULT) -> RequirementRefused:
    with pytest.raises(RequirementRefused) as info:
        checked_requirements(text, policy)
    return info.value


def test_what_mlflow_writes_passes_unchanged():
    text = "mlflow==3.17.2\ncloudpickle==3.1.1\nnumpy==2.4.6\nscikit-learn==1.9.1\n"
    assert checked_requirements(text, DEFAULT) == text


@pytest.mark.parametrize(
    "line",
    [
        "numpy",
        "numpy==2.4.6",
        "scikit-learn[alldeps]>=1.5,<2",
        "pandas ; python_version >= '3.10'",
        'torch==2.5.0; platform_machine == "x86_64" and sys_platform == "linux"',
        f"numpy==2.4.6 {HASH}",
        f"numpy==2.4.6 {HASH} --hash=sha512:{'cd' * 64}",
        f"numpy==2.4.6 --hash sha256:{'ab' * 32}",
        "Zope.Interface===5.0",
    ],
)
def test_named_requirements_pass(line):
    assert checked_requirements(line, DEFAULT) == f"{line}\n"


def test_comments_blank_lines_and_continuations_are_read_as_pip_reads_them():
    text = "# pinned by MLflow\n\nnumpy==2.4.6  # comment\npandas \\\n  ==3.1.1\n"
    assert checked_requirements(text, DEFAULT) == "numpy==2.4.6\npandas   ==3.1.1\n"
    # A comment ending in a backslash continues nothing (pip's rule): the option is seen.
    assert refused("numpy\n# note \\\n-r /etc/passwd\n").line == 3


@pytest.mark.parametrize(
    ("text", "line", "shown"),
    [
        ("numpy\n-r /etc/passwd\n", 2, "'-r /etc/passwd'"),
        ("-c constraints.txt", 1, "'-c constraints.txt'"),
        ("-e git+https://example.com/x.git#egg=x", 1, "'-e git+https://example.com/x.git#eg"),
        ("--index-url http://127.0.0.1:1/simple", 1, "'--index-url http://127.0.0.1:1/simple'"),
        ("numpy\n\n--extra-index-url http://h/simple", 3, "'--extra-index-url http://h/simple'"),
        ("--find-links /tmp/wheels", 1, "'--find-links /tmp/wheels'"),
        ("-f ./wheels", 1, "'-f ./wheels'"),
        ("--trusted-host evil.example", 1, "'--trusted-host evil.example'"),
        ("--pre", 1, "'--pre'"),
        ("--require-hashes", 1, "'--require-hashes'"),
    ],
)
def test_option_lines_fail_naming_the_line(text, line, shown):
    error = refused(text)
    assert error.line == line
    assert str(error).startswith(f"requirements.txt line {line}: {shown}")
    assert isinstance(error, PermanentError) and not is_retryable(error)


@pytest.mark.parametrize(
    "line",
    [
        "/etc/passwd",
        "./mypkg",
        "../wheels/x-1.0-py3-none-any.whl",
        "~/pkg",
        "mypkg-1.0-py3-none-any.whl",
        "mypkg.tar.gz",
        "pkg @ file:///etc/passwd",
        "pkg @ file://localhost/etc/passwd",
        "pkg @ /etc/passwd",
        "pkg @ git+file:///srv/repo",
        "https://example.com/pkg-1.0-py3-none-any.whl",
        "git+https://example.com/pkg.git",
    ],
)
def test_local_paths_and_bare_urls_are_never_installed(line):
    for policy in (DEFAULT, EVERYTHING):
        assert refused(line, policy).line == 1


@pytest.mark.parametrize(
    "line",
    [
        "numpy --index-url=http://h/simple",
        "numpy --extra-index-url http://h/simple",
        "numpy --global-option=--prefix=/",
        "numpy --config-settings=editable_mode=compat",
        "numpy --hash=md5:0123",
        "numpy --hash=sha256:not-hex",
    ],
)
def test_only_hash_options_may_follow_a_requirement(line):
    assert "is not allowed on a requirement line" in str(refused(line))


def test_environment_variables_are_refused_not_expanded():
    # pip and uv would substitute the installer's environment (index credentials) here.
    assert "environment variable" in str(refused("pkg @ https://h/${UV_INDEX_URL}.whl", DIRECT))
    assert refused("numpy; platform_release == '${HOME}'").line == 1


def test_direct_references_need_the_operators_opt_in():
    wheel = "pkg @ https://example.com/pkg-1.0-py3-none-any.whl"
    assert "MLFLOW_DOCK_ALLOW_DIRECT_REFERENCES" in str(refused(wheel))
    assert checked_requirements(wheel, DIRECT) == f"{wheel}\n"
    vcs = "pkg @ git+https://example.com/pkg.git@v1"
    assert "MLFLOW_DOCK_ALLOW_DIRECT_REFERENCES" in str(refused(vcs))


def test_references_that_are_built_from_source_also_need_sdists():
    for line in ("pkg @ git+https://example.com/pkg.git@v1", "pkg @ https://h/pkg-1.0.tar.gz"):
        assert "MLFLOW_DOCK_ALLOW_SDISTS" in str(refused(line, DIRECT))
        assert checked_requirements(line, EVERYTHING) == f"{line}\n"
    assert "only http(s)" in str(refused("pkg @ ftp://h/pkg-1.0-py3-none-any.whl", EVERYTHING))


def test_the_reason_shows_a_truncated_printable_token():
    error = refused("-r " + "x" * 500 + "\x1b[31m")
    shown = str(error).split(": ", 1)[1].split("' ", 1)[0]
    assert len(shown) <= 61 and shown.endswith("…") and "\x1b" not in str(error)


# --------------------------------------------------------------------------- properties

_HASH_WORD = re.compile(r"--hash[= ](sha256|sha384|sha512):[0-9a-fA-F]+")


def _is_named_requirement_with_hashes(line: str) -> bool:
    """The property's oracle: a PEP 508 requirement without URL, then only --hash options."""
    words = line.split()
    cut = next((i for i, word in enumerate(words) if word.startswith("-")), len(words))
    options = " ".join(words[cut:])
    rest = _HASH_WORD.sub("", options).strip()
    try:
        requirement = Requirement(" ".join(words[:cut]))
    except InvalidRequirement:
        return False
    return requirement.url is None and not rest and "${" not in line


names = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?", fullmatch=True).filter(
    lambda name: not name.lower().endswith((".whl", ".zip", ".tar", ".tgz", ".gz"))
)
specifiers = st.lists(
    st.tuples(
        st.sampled_from(["==", ">=", "<=", "~=", "!=", "<", ">"]),
        st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){1,2}", fullmatch=True),
    ),
    max_size=3,
).map(lambda parts: ",".join(op + version for op, version in parts))
markers = st.sampled_from(
    ["", "; python_version >= '3.9'", ' ; sys_platform == "linux"', "; extra == 'x'"]
)
hashes = st.lists(
    st.sampled_from(["sha256", "sha384", "sha512"]).map(lambda a: f"--hash={a}:{'0f' * 16}"),
    max_size=2,
)
extras = st.lists(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True), max_size=2).map(
    lambda found: f"[{','.join(found)}]" if found else ""
)
named_lines = st.builds(
    lambda name, extra, spec, marker, found: " ".join(
        [f"{name}{extra}{spec}{marker}", *found]
    ).strip(),
    names,
    extras,
    specifiers,
    markers,
    hashes,
)
# Lines an attacker would write: fragments of options, URLs and paths, spliced into requirements.
hostile = st.sampled_from(
    [
        "-r ",
        "-c ",
        "-e ",
        "--index-url ",
        "-i ",
        "--extra-index-url=",
        "--find-links ",
        "-f",
        "--trusted-host ",
        " @ ",
        "file://",
        "/etc/passwd",
        "../",
        "./",
        "~/",
        "http://127.0.0.1:9/",
        "git+https://h/r.git",
        ".whl",
        ".tar.gz",
        "${HOME}",
        " --hash=sha256:",
        " --global-option=x",
        "#",
        "\\\n",
        "\n",
        ";",
        " ",
    ]
)
spliced = st.lists(st.one_of(hostile, names, specifiers, st.text(max_size=4)), max_size=8).map(
    "".join
)


@settings(max_examples=400, deadline=None)
@given(named_lines)
def test_every_named_requirement_line_is_accepted_as_written(line):
    assert checked_requirements(line, DEFAULT) == f"{line}\n"


@settings(max_examples=800, deadline=None)
@given(st.one_of(spliced, st.text(max_size=40), named_lines))
def test_nothing_but_named_requirements_with_hashes_is_accepted(text):
    try:
        accepted = checked_requirements(text, DEFAULT)
    except RequirementRefused as error:
        assert str(error).startswith(f"requirements.txt line {error.line}: '")
        assert 1 <= error.line <= max(1, len(text.splitlines()))
        return
    for line in accepted.splitlines():
        assert _is_named_requirement_with_hashes(line), line
        assert line == line.strip() and not line.startswith(("-", "#"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(spliced, named_lines))
def test_opt_ins_only_add_url_and_vcs_references(text):
    try:
        accepted = checked_requirements(text, EVERYTHING)
    except RequirementRefused:
        return
    for line in accepted.splitlines():
        words = line.split()
        cut = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
        requirement = Requirement(" ".join(words[:cut]))
        if requirement.url is not None:
            assert requirement.url.lower().startswith(("http://", "https://", "git+", "hg+"))
            assert not requirement.url.lower().startswith(("git+file", "hg+file"))
