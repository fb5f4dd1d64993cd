"""JSON and text log lines: context fields on every line of a job or delivery, redaction."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from mlflow_dock.jobs.logs import REDACTED, Redactor
from mlflow_dock.observe.context import bind, current, log_context
from mlflow_dock.observe.logformat import JsonFormatter, TextFormatter, configure_logging


@pytest.fixture
def capture():
    """A logger writing through the given formatter into a buffer (root stays untouched)."""
    created = []

    def make(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
        buffer = io.StringIO()
        handler = logging.StreamHandler(buffer)
        handler.setFormatter(formatter)
        logger = logging.getLogger(f"mlflow_dock.test.{len(created)}")
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        created.append(logger)
        return logger, buffer

    yield make
    for logger in created:
        logger.handlers = []


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_line_has_the_fields_and_the_context(capture):
    logger, buffer = capture(JsonFormatter())
    logger.info("outside")
    with log_context(job_id="j-1", delivery_id="d-1", model="Iris", version="3"):
        logger.warning("pushing %s", "layer")
    outside, inside = lines(buffer)
    assert set(outside) == {"timestamp", "level", "logger", "message"}
    assert outside["timestamp"].endswith("+00:00")
    assert inside["level"] == "warning" and inside["message"] == "pushing layer"
    assert inside["logger"] == logger.name
    assert (inside["job_id"], inside["delivery_id"], inside["model"], inside["version"]) == (
        "j-1",
        "d-1",
        "Iris",
        "3",
    )


def test_every_line_is_one_json_object_even_with_newlines_and_tracebacks(capture):
    logger, buffer = capture(JsonFormatter())
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("failed:\n%s", "two lines")
    [line] = lines(buffer)
    assert line["message"] == "failed:\ntwo lines"
    assert "ValueError: bad" in line["exception"]


def test_secrets_are_redacted_in_message_and_traceback(capture):
    redactor = Redactor(["configured-secret"])
    logger, buffer = capture(JsonFormatter(redactor))
    redactor.learn("ya29.fetched-google-token")
    try:
        raise RuntimeError("token ya29.fetched-google-token refused")
    except RuntimeError:
        logger.exception("using configured-secret and ya29.fetched-google-token")
    [line] = lines(buffer)
    assert "configured-secret" not in json.dumps(line)
    assert "ya29.fetched-google-token" not in json.dumps(line)
    assert line["message"] == f"using {REDACTED} and {REDACTED}"
    assert REDACTED in line["exception"]


def test_text_format_appends_the_context_and_redacts(capture):
    logger, buffer = capture(TextFormatter(Redactor(["hunter22"])))
    with log_context(job_id="j-9", model="m"):
        logger.info("password hunter22")
    text = buffer.getvalue()
    assert "password [REDACTED] [job_id=j-9 model=m]" in text


def test_context_is_per_thread_and_restored_after_the_block():
    seen = {}

    def other():
        seen["other"] = dict(current())

    with log_context(job_id="j-1"):
        bind(model="late", nonsense="ignored")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        seen["inside"] = dict(current())
    assert seen["inside"] == {"job_id": "j-1", "model": "late"}
    assert seen["other"] == {}
    assert dict(current()) == {}


def test_unknown_context_fields_are_refused():
    with pytest.raises(ValueError, match="unknown"), log_context(password="x"):
        pass


def test_configure_logging_routes_the_root_logger():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    try:
        configure_logging("info", "json", redact=Redactor(["s3cr3t"]), stream=buffer)
        logging.getLogger("uvicorn.error").info("started with s3cr3t")
        logging.getLogger("some.library").debug("not shown at info")
    finally:
        root.handlers = saved[0]
        root.setLevel(saved[1])
    [line] = lines(buffer)
    assert line["logger"] == "uvicorn.error" and line["message"] == f"started with {REDACTED}"


def test_lines_of_an_accepted_delivery_carry_its_context(tmp_path):
    """The intake's own log line, formatted as JSON, names the delivery, job, model, version."""
    import time as _time

    from mlflow_dock.intake.accept import Intake
    from mlflow_dock.intake.signatures import WebhookVerifier, sign
    from mlflow_dock.store.facade import JobStore

    store = JobStore.from_url(f"sqlite:///{tmp_path / 'jobs.db'}")
    intake = Intake(verifier=WebhookVerifier(["whsec-ctx"]), store=store)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("mlflow_dock.intake.accept")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        body = json.dumps(
            {
                "entity": "model_version",
                "action": "created",
                "data": {"name": "Iris", "version": "4"},
            }
        ).encode()
        ts = str(int(_time.time()))
        headers = {
            "X-MLflow-Delivery-Id": "d-ctx",
            "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": sign("whsec-ctx", "d-ctx", ts, body),
        }
        job = intake.accept(body, headers).job
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        store.close()
    [line] = [entry for entry in lines(buffer) if "d-ctx" in entry["message"]]
    assert line["delivery_id"] == "d-ctx" and line["job_id"] == job.id
    assert (line["model"], line["version"]) == ("Iris", "4")
