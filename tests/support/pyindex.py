"""A private package index for tests: PyPI's simple API behind HTTP basic auth, on loopback.

Only the index pages pass through it (PyPI's file links are absolute, so installers fetch the
files from files.pythonhosted.org themselves); a request without the right credentials gets a
401, so a build that succeeds through it proves the credentials reached the installer.
"""

from __future__ import annotations

import base64
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

UPSTREAM = "https://pypi.org"


@dataclass
class PrivateIndex:
    """``url`` carries the credentials (``http://user:token@127.0.0.1:port/simple``)."""

    username: str
    token: str
    server: ThreadingHTTPServer
    authorized: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{self.username}:{self.token}@{host!s}:{port}/simple"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_private_index(ca_bundle: Path | None = None) -> PrivateIndex:
    """Serve PyPI's /simple/ on 127.0.0.1 behind basic auth with a fresh, recognisable token."""
    username, token = "dock-index", f"idx-secret-{secrets.token_hex(12)}"
    expected = "Basic " + base64.b64encode(f"{username}:{token}".encode()).decode()
    upstream = httpx.Client(
        base_url=UPSTREAM,
        verify=str(ca_bundle) if ca_bundle is not None and ca_bundle.exists() else True,
        follow_redirects=True,
        timeout=60,
    )
    index: PrivateIndex

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                index.refused.append(self.path)
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="private index"')
                self.end_headers()
                return
            index.authorized.append(self.path)
            if not self.path.startswith("/simple"):
                self.send_response(404)
                self.end_headers()
                return
            accept = self.headers.get("Accept", "text/html")
            answer = upstream.get(self.path, headers={"Accept": accept})
            body = answer.content
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers.get("Content-Type", "text/html"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    index = PrivateIndex(username, token, server)
    threading.Thread(target=server.serve_forever, name="private-index", daemon=True).start()
    return index
