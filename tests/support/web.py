"""HTTP calls for tests and benches, over one client per process.

`web.get()` builds a client, and with it a TLS context that loads certifi's CA bundle, on
every call: 20-30 ms of CPU each. The suite polls services, registries and containers
thousands of times, and a profile of one end-to-end test found half of its pytest process's
CPU there. Keep-alive is off, so a server restarted on the same port never meets a stale
pooled connection; a new TCP connection to 127.0.0.1 costs far less than the context did.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx

__all__ = ["client", "delete", "get", "post"]


@functools.cache
def client() -> httpx.Client:
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def get(url: str, **kwargs: Any) -> httpx.Response:
    return client().get(url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return client().post(url, **kwargs)


def delete(url: str, **kwargs: Any) -> httpx.Response:
    return client().delete(url, **kwargs)
