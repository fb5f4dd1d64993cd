"""Log line formats: `text` (the default) and `json` (one object per line), both redacted.

Every line emitted while a job or delivery is handled carries its context (job id, delivery
id, model, version, alias; see `observe.context`): as fields in JSON, as a `[key=value ...]`
suffix in text. Secrets are replaced in the message and in tracebacks before anything is
written, including tokens the credential providers fetched at run time (`Redactor.learn`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from mlflow_dock.observe.context import FIELDS, current

LogFormat = Literal["text", "json"]
Redact = Callable[[str], str]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _no_redaction(text: str) -> str:
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, context fields."""

    def __init__(self, redact: Redact = _no_redaction) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        context = current()
        for name in FIELDS:
            if name in context:
                line[name] = context[name]
        if record.exc_info:
            line["exception"] = self._redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = self._redact(record.exc_text)
        if record.stack_info:
            line["stack"] = self._redact(self.formatStack(record.stack_info))
        # ensure_ascii=False: model names are often not ASCII; one line stays one line anyway.
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The usual text line, plus the context as `[job_id=... model=...]`, redacted."""

    def __init__(self, redact: Redact = _no_redaction) -> None:
        super().__init__(_TEXT_FORMAT)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = current()
        if context:
            pairs = " ".join(f"{k}={context[k]}" for k in FIELDS if k in context)
            text = f"{text} [{pairs}]" if "\n" not in text else text + f"\n[{pairs}]"
        return self._redact(text)


def make_formatter(fmt: LogFormat, redact: Redact = _no_redaction) -> logging.Formatter:
    return JsonFormatter(redact) if fmt == "json" else TextFormatter(redact)


def configure_logging(
    level: str,
    fmt: LogFormat = "text",
    *,
    redact: Redact = _no_redaction,
    stream: TextIO | None = None,
) -> None:
    """Route every logger (ours, uvicorn's, libraries') through one redacting handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt, redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
