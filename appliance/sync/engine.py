"""The engine as sync sees it: told to load each activated snapshot through its admin socket,
then watched through the health window. An engine that is not up yet (the supervisor starts
it once a first snapshot is active, or again after a crash) is waited for: a version counts
only once the engine says it serves it.

What a healthy engine is, is `judge` below: the one definition the supervisor's health round
and this health window both use (and the console shows, through the supervisor's status).
The window adds one check of its own: the error rate over the window is not above the rate
before the load (with a little slack, and only once enough requests came to tell).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector

log = logging.getLogger("adpop.sync")

STATUS_TIMEOUT = 2.0
LOAD_TIMEOUT = 10.0  # a load maps and validates the payload: seconds for the largest ones

# The window's error rate may exceed the earlier one by this much before it counts as worse.
RATE_SLACK = 0.01
MIN_REQUESTS = 100  # fewer requests in the window say nothing about its error rate
# How long a window waits for the engine to answer at all: a start maps and checks the
# payload, and the supervisor starts it on its next health round.
ENGINE_WAIT = 60.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # why not, or what an operator should know ("draining"); "" when neither


def judge(status: Mapping[str, Any], active: int | None) -> Verdict:
    """Whether an engine that answered its admin socket with `status` is healthy: its own
    health (what its /healthz answers: "ok", "draining" or "no snapshot") is ok or draining,
    and it serves `active` (None: whatever it serves). Draining is an operator's choice: it
    is healthy, and says so."""
    health = str(status.get("health", "ok"))
    if health not in ("ok", "draining"):
        return Verdict(False, f"engine reports {health}")
    version = int(status.get("version", 0))
    if active is not None and version != active:
        return Verdict(False, f"engine serves v{version}, v{active} is active")
    return Verdict(True, "draining" if health == "draining" else "")


@dataclass(frozen=True)
class Sample:
    version: int
    requests: int
    errors: int

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> Sample:
        errors = status.get("errors", {})
        return cls(int(status.get("version", 0)), int(status.get("requests", 0)),
                   sum(int(v) for v in errors.values()) if isinstance(errors, dict) else 0)


class EngineAdmin:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def running(self) -> bool:
        return os.path.exists(self.socket_path)

    async def _call(self, method: str, path: str,
                    body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        timeout = ClientTimeout(total=LOAD_TIMEOUT if path == "/load" else STATUS_TIMEOUT)
        async with ClientSession(connector=UnixConnector(path=self.socket_path),
                                 timeout=timeout) as session, \
                session.request(method, f"http://engine{path}", data=body) as resp:
            answer: dict[str, Any] = await resp.json(content_type=None)
            return resp.status, answer

    async def call(self, method: str, path: str,
                   body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """One admin request; raises ClientError, OSError or TimeoutError when it fails."""
        return await self._call(method, path, body)

    async def status(self) -> dict[str, Any]:
        return (await self._call("GET", "/status"))[1]

    async def sample(self) -> Sample:
        return Sample.of(await self.status())

    async def load(self) -> str:
        """Tell the engine to load `current`; "" when it did, else why not."""
        try:
            code, body = await self._call("POST", "/load")
        except (TimeoutError, ClientError, OSError) as exc:
            return f"engine admin socket {self.socket_path}: {exc or type(exc).__name__}"
        if code != 200:
            return f"engine refused the load: {body.get('error', body)}"
        return ""


class EngineHealth:
    """The health check the sync agent runs through a window: load first, then watch."""

    def __init__(self, admin: EngineAdmin, wait: float = ENGINE_WAIT) -> None:
        self.admin = admin
        self.wait = wait
        self.before: Sample | None = None
        self.first: Sample | None = None
        self.expect_version = 0

    async def start(self, version: int) -> str:
        """Returns once the engine serves `version` ("") or why it does not: it is told to
        load `current` when it serves another version, and waited for while it does not
        answer."""
        self.expect_version = version
        self.before = self.first = None
        deadline = time.monotonic() + self.wait
        loaded = False
        while True:
            try:
                sample = await self.admin.sample()
            except TimeoutError:
                # Its socket takes the connection and nothing answers: hung, not starting.
                return (f"engine not answering on its admin socket within "
                        f"{STATUS_TIMEOUT:.0f} s")
            except (ClientError, OSError) as exc:
                if time.monotonic() >= deadline:
                    return (f"engine did not answer on {self.admin.socket_path} within "
                            f"{self.wait:.0f} s: {exc or type(exc).__name__}")
                await asyncio.sleep(0.2)
                continue
            if sample.version == version:
                self.first = sample
                self.before = self.before or sample
                return ""
            if loaded:
                return f"engine serves v{sample.version} after being told to load v{version}"
            self.before = sample
            problem = await self.admin.load()
            if problem:
                return problem
            loaded = True

    async def check(self) -> str:
        try:
            status = await self.admin.status()
        except (TimeoutError, ClientError, OSError) as exc:
            return f"engine stopped answering: {exc or type(exc).__name__}"
        verdict = judge(status, self.expect_version)
        if not verdict.ok:
            return verdict.reason
        now = Sample.of(status)
        if self.before is None or self.first is None:
            return ""
        requests = now.requests - self.first.requests
        if requests < MIN_REQUESTS:
            return ""
        rate = (now.errors - self.first.errors) / requests
        baseline = self.before.errors / self.before.requests if self.before.requests else 0.0
        if rate > baseline + RATE_SLACK:
            return f"error rate {rate:.1%} against {baseline:.1%} before the load"
        return ""
