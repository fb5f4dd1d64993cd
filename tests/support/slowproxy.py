"""A reverse proxy that holds chosen requests for a while: a slow dependency, on demand.

Tests that need a build to be running for a known time point the service's
`MLFLOW_TRACKING_URI` at it (a slow MLflow, as a remote artifact store can be), without burning
the CPU a genuinely long build would. Everything is forwarded unchanged; requests whose path
matches `slow_paths` are answered `delay` seconds late.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# Hop-by-hop headers (RFC 9110 7.6.1) and those the forwarding itself recomputes.
_NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
    "content-encoding",
}


@dataclass
class SlowProxy:
    upstream: str
    slow_paths: tuple[str, ...]
    delay: float
    held: list[str] = field(default_factory=list)  # paths answered late, in order
    url: str = ""


def _handler(proxy: SlowProxy, client: httpx.Client) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if any(part in self.path for part in proxy.slow_paths):
                proxy.held.append(self.path)
                time.sleep(proxy.delay)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
            answer = client.request(self.command, self.path, headers=headers, content=body)
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in _NOT_FORWARDED:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *_args: object) -> None:
            return None

    return Forward


@contextmanager
def slow_proxy(upstream: str, *, slow_paths: tuple[str, ...], delay: float) -> Iterator[SlowProxy]:
    """Serve on a free loopback port until the block ends."""
    proxy = SlowProxy(upstream=upstream.rstrip("/"), slow_paths=slow_paths, delay=delay)
    with httpx.Client(base_url=proxy.upstream, timeout=120) as client:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy, client))
        server.daemon_threads = True
        proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, name="slow-proxy", daemon=True)
        thread.start()
        try:
            yield proxy
        finally:
            server.shutdown()
            server.server_close()
