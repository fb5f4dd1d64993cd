"""The one exception tree of mlflow-dock.

    MlflowDockError
     +-- ConfigError                 a setting is missing or invalid (CLI exits 2)
     +-- RequestError                the caller sent something we refuse (HTTP 4xx)
     |    +-- TimestampError         400: X-MLflow-Timestamp missing, malformed or too far off
     |    +-- HeaderError            400: another required header is missing or malformed
     |    +-- SignatureError         401: X-MLflow-Signature missing or wrong
     |    +-- PayloadTooLargeError   413
     |    +-- PayloadError           422: authenticated, but not an event we can act on
     |    +-- NotFoundError          404
     |    +-- UnavailableError       503: the job store is down; MLflow retries a 503 delivery
     +-- LeaseLostError              a worker's lease on a job expired and another took it over
     +-- JobError                    running a job failed
          +-- RetryableError         transient: registry 5xx, connection errors, timeouts
          +-- PermanentError         retrying cannot help: auth denied, model not found, bad image

Whether a job failure is retried is decided only by `is_retryable`; HTTP status codes are mapped
from these classes in one table in `api.py`.
"""

from __future__ import annotations


class MlflowDockError(Exception):
    """Root of every error mlflow-dock raises on purpose."""


class ConfigError(MlflowDockError):
    """A setting is missing or invalid; the message names the variable."""


class RequestError(MlflowDockError):
    """The client's request is refused; the message is safe to return to the client."""


class TimestampError(RequestError):
    pass


class HeaderError(RequestError):
    pass


class SignatureError(RequestError):
    pass


class UnauthorizedError(RequestError):
    """A read endpoint was called without the configured bearer token."""


class PayloadTooLargeError(RequestError):
    pass


class PayloadError(RequestError):
    pass


class NotFoundError(RequestError):
    pass


class UnavailableError(RequestError):
    """A dependency the request needs (the job store) is down; the client should retry."""


class LeaseLostError(MlflowDockError):
    """The job is no longer this worker's: its lease expired and it was queued or claimed again.

    The worker drops its result; whoever holds the job now records the outcome.
    """


class JobError(MlflowDockError):
    """A step of a job failed. `reason` is the one line shown to users."""


class RetryableError(JobError):
    pass


class PermanentError(JobError):
    pass


def is_retryable(exc: BaseException) -> bool:
    """The single place that decides whether a failed job is tried again.

    Anything we did not classify (a bug, an unexpected library error) is treated as permanent:
    retrying an unknown failure five times only delays the visible error.
    """
    return isinstance(exc, RetryableError)
