"""An operator's client for the origin's API (`adpop origin … --origin URL`).

Over https:// it trusts the system's CAs and, when the token pins one (tokens made by the
origin do), the origin's own CA: fetched from /v1/ca and used only if its SHA-256 is the
pinned one, before the token is sent anywhere. A token is never sent over plain HTTP to a
host other than loopback.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit

from appliance.origin.ops import Json, Op, OpsError, Refused

TIMEOUT = 120.0  # a publish of a large campaign set compiles for a while


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OriginClient:
    def __init__(self, url: str, token: str) -> None:
        self.base = url.rstrip("/")
        self.token = token
        self._tls: ssl.SSLContext | None = None
        parts = urlsplit(self.base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OpsError(f"--origin {url!r} is not an http(s) URL",
                           hint="give --origin https://HOST:PORT")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise OpsError(f"refusing to send an operator token over plain HTTP to {url}",
                           hint="use the origin's https:// address")

    def _context(self) -> ssl.SSLContext | None:
        if not self.base.startswith("https://"):
            return None
        if self._tls is not None:
            return self._tls
        from appliance.origin.ca import pinned_context, split

        ctx: ssl.SSLContext | None = ssl.create_default_context()
        _, pinned = split(self.token)
        if pinned:
            # Unverified on purpose, and without the token: what comes back is used only
            # when it is the CA the token pins.
            try:
                with urllib.request.urlopen(f"{self.base}/v1/ca", timeout=TIMEOUT,
                                            context=ssl._create_unverified_context()) as resp:
                    ctx = pinned_context(resp.read(64 * 1024), pinned)
            except (OSError, ValueError) as exc:
                raise OpsError(f"cannot read the CA of {self.base}: {exc}",
                               hint="check --origin and that the origin runs") from exc
            if ctx is None:
                raise OpsError(f"the CA of {self.base} is not the one the token names",
                               hint="check --origin; the token was not sent")
        self._tls = ctx
        return ctx

    def call(self, op: Op, params: Mapping[str, str], body: Json) -> Json:
        data = json.dumps(body).encode() if op.method != "GET" else None
        query = "?" + urllib.parse.urlencode(body) if op.method == "GET" and body else ""
        request = urllib.request.Request(
            f"{self.base}{op.url(params)}{query}", data=data, method=op.method,
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT,
                                        context=self._context()) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())["error"]
                message, hint = str(error["message"]), ""
            except (ValueError, KeyError, TypeError):
                message, hint = f"HTTP {exc.code}", "check --origin"
            if exc.code in (401, 403):
                raise Refused(exc.code, message, hint) from exc
            raise OpsError(message, hint=hint) from exc
        except (OSError, ValueError) as exc:
            raise OpsError(f"cannot reach the origin at {self.base}: {exc}",
                           hint="check --origin and that the origin runs") from exc
        if not isinstance(answer, dict):
            raise OpsError(f"{self.base} answered no JSON object", hint="check --origin")
        return answer
