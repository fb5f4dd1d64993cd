"""The server's one exception type.

Not `mlflow_dock.errors`: this package runs inside the image, where no other module of ours
exists. Each error carries the HTTP status the protocol answers with.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A request the server refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def not_found(message: str) -> ProtocolError:
    return ProtocolError(message, status=404)
