"""Read access: an optional bearer token in front of every read endpoint.

The webhook is authenticated by its HMAC signature alone (MLflow cannot send a bearer token);
everything that shows jobs, images or logs is behind `ReadAccess` when a token is configured.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from mlflow_dock.errors import UnauthorizedError

COOKIE_NAME = "mlflow_dock_token"


class ReadAccess:
    """A FastAPI dependency: passes when no token is set or the request presents it.

    Browsers cannot add an Authorization header to a plain link, so the board also accepts the
    token from a cookie (set by the board's sign-in form); API clients use the header.
    """

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def allows(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            presented = request.cookies.get(COOKIE_NAME, "")
        return self.accepts(presented)

    def accepts(self, presented: str) -> bool:
        """Whether `presented` is the token (the board's sign-in form checks it with this)."""
        if self._token is None:
            return True
        # Constant-time: the token is a shared secret.
        return hmac.compare_digest(presented.strip().encode(), self._token)

    async def __call__(self, request: Request) -> None:
        if not self.allows(request):
            raise UnauthorizedError("a valid bearer token is required (MLFLOW_DOCK_API_TOKEN)")
