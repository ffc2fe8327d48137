"""Helpers the benchmarks share."""

from __future__ import annotations

import ssl
import time
import urllib.request


def wait_http(url: str, timeout: float = 15, context: ssl.SSLContext | None = None) -> None:
    """Until `url` answers (any status a urlopen accepts), or raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                resp.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
