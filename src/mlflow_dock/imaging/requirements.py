"""What a model's requirements.txt may ask the build to install (pure: no I/O).

A model version's requirements are written by whoever registered it, and every builder hands
them to pip or uv, which read far more than package names from such a file: `-r /etc/passwd`
reads (and echoes in its error) any file on the worker, `--extra-index-url` and `pkg @ URL`
send requests to any host, `--find-links ./dir` and local paths install whatever is on disk,
`${VAR}` expands the installer's environment (which holds the index credentials), and a
source distribution runs its setup.py at build time. So by default only *named* requirements
pass: a PEP 508 name with extras, version specifiers and environment markers, optionally
followed by `--hash=` options; they are installed from the operator's configured indexes, as
wheels only. URL and VCS references, and building from source, are each an operator opt-in.

The first offending line fails the version permanently; the reason names the line number and
the offending text (truncated, control characters replaced), never anything the line points at.
Parsing is `packaging`'s (the PEP 508 reference implementation); only the requirements-file
layer around it (comments, continuations, per-line options) is pip's and written here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement

from mlflow_dock.errors import PermanentError

__all__ = ["RequirementRefused", "RequirementsPolicy", "check_line", "checked_requirements"]


@dataclass(frozen=True)
class RequirementsPolicy:
    """The operator's choices (MLFLOW_DOCK_ALLOW_DIRECT_REFERENCES, MLFLOW_DOCK_ALLOW_SDISTS)."""

    # `name @ https://...` and `name @ git+https://...`: requests to hosts the model names.
    allow_direct_references: bool = False
    # Source distributions (and VCS checkouts, which are always built): code runs at build time.
    allow_sdists: bool = False

    @property
    def wheels_only(self) -> bool:
        return not self.allow_sdists


class RequirementRefused(PermanentError):
    """A requirements line the policy does not install; `line` is 1-based, as editors count."""

    def __init__(self, line: int, token: str, why: str) -> None:
        super().__init__(f"requirements.txt line {line}: {_shown(token)} {why}")
        self.line = line
        self.token = token


# pip's comment rule: "#" at the start of a line or after whitespace (a URL's "#egg=" stays).
_COMMENT = re.compile(r"(^|\s+)#.*$")
_COMMENT_LINE = re.compile(r"\s*#")
_HASH_OPTION = re.compile(r"--hash=(sha256|sha384|sha512):[0-9a-fA-F]+")
# What pip and uv treat as a file to install when a "name" ends with it.
_ARCHIVE_SUFFIXES: tuple[str, ...] = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2")
_ARCHIVE_SUFFIXES += (".tbz", ".tar.xz", ".txz", ".tlz", ".tar.lz", ".tar.lzma")
_VCS_PREFIXES = ("git+", "hg+", "svn+", "bzr+")
_SHOWN_LENGTH = 60

_NOT_AN_OPTION = (
    "is not allowed: requirements files may name packages only (no -r, -c, -e, index or "
    "find-links options); packages come from the configured indexes"
)


def checked_requirements(text: str, policy: RequirementsPolicy) -> str:
    """`text` with comments, blank lines and continuations removed, if every line passes.

    Raises RequirementRefused for the first line the policy refuses. Accepted lines are kept as
    written (stripped): re-rendering them would change the runtime key of every model.
    """
    kept = []
    for number, line in _logical_lines(text):
        check_line(line, policy, number=number)
        kept.append(line)
    return "".join(f"{line}\n" for line in kept)


def check_line(line: str, policy: RequirementsPolicy, *, number: int = 1) -> Requirement:
    """The requirement one logical line (comment-free, stripped) asks for, if allowed."""
    if "${" in line:
        # pip and uv expand ${NAME} from their environment; the installer's holds index tokens.
        raise RequirementRefused(
            number, line, "is not allowed: environment variable references are not expanded"
        )
    if line.startswith("-"):
        raise RequirementRefused(number, line, _NOT_AN_OPTION)
    text, options = _split_options(line)
    for option in options:
        if not _HASH_OPTION.fullmatch(option):
            raise RequirementRefused(
                number,
                option,
                "is not allowed on a requirement line (only --hash=<algorithm>:<digest> is)",
            )
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        raise RequirementRefused(
            number,
            text,
            "is not a named requirement (PEP 508: a package name, optional [extras], "
            "version specifiers and ; markers); local paths and bare URLs are not installed",
        ) from None
    if requirement.name.lower().endswith(_ARCHIVE_SUFFIXES):
        # pip and uv install a "name" ending like an archive as a local file.
        raise RequirementRefused(
            number, text, "is not allowed: it names a local archive, not a package"
        )
    if requirement.url is not None:
        _check_reference(requirement.url, text, number, policy)
    return requirement


def _check_reference(url: str, text: str, number: int, policy: RequirementsPolicy) -> None:
    lowered = url.lower()
    vcs = lowered.startswith(_VCS_PREFIXES)
    scheme = urlsplit(lowered.split("+", 1)[1] if vcs else lowered).scheme
    if scheme in ("", "file"):
        raise RequirementRefused(
            number, text, "is not allowed: local paths and file: references are never installed"
        )
    if scheme not in (("http", "https", "ssh", "git") if vcs else ("http", "https")):
        raise RequirementRefused(
            number, text, "is not allowed: only http(s) URLs and VCS references are fetched"
        )
    if not policy.allow_direct_references:
        raise RequirementRefused(
            number,
            text,
            "is not allowed: URL and VCS references need MLFLOW_DOCK_ALLOW_DIRECT_REFERENCES=true",
        )
    if policy.wheels_only and (vcs or not urlsplit(url).path.lower().endswith(".whl")):
        raise RequirementRefused(
            number,
            text,
            "is not allowed: it is built from source, which needs MLFLOW_DOCK_ALLOW_SDISTS=true",
        )


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(number of the first physical line, stripped text) per non-empty logical line.

    pip's own reading (pip/_internal/req/req_file.py), mirrored because MLflow's stock builder
    hands the model's file to pip unchanged: a trailing backslash joins the next line unless
    the line is a comment, then comments are dropped. Any difference would let a line reach
    pip that this check never saw.
    """
    joined: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.endswith("\\") and not _COMMENT_LINE.match(raw):
            if not pending:
                start = number
            pending.append(raw.strip("\\"))
            continue
        if _COMMENT_LINE.match(raw):
            raw = " " + raw
        if pending:
            joined.append((start, "".join([*pending, raw])))
            pending = []
        else:
            joined.append((number, raw))
    if pending:
        joined.append((start, "".join(pending)))
    lines = []
    for number, line in joined:
        if stripped := _COMMENT.sub("", line).strip():
            lines.append((number, stripped))
    return lines


def _split_options(line: str) -> tuple[str, list[str]]:
    """pip's split of a line into the requirement and its options: at the first "-" word."""
    words = line.split()
    for index, word in enumerate(words):
        if word.startswith("-"):
            return " ".join(words[:index]), _joined_values(words[index:])
    return line, []


def _joined_values(words: list[str]) -> list[str]:
    # `--hash sha256:...` is `--hash=sha256:...` to pip; one form to check.
    options: list[str] = []
    for word in words:
        if options and not word.startswith("-") and "=" not in options[-1]:
            options[-1] = f"{options[-1]}={word}"
        else:
            options.append(word)
    return options


def _shown(token: str) -> str:
    """The offending text as a reason shows it: one line, printable, at most 60 characters."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in token)
    if len(printable) > _SHOWN_LENGTH:
        printable = printable[: _SHOWN_LENGTH - 1] + "…"
    return f"'{printable}'"
