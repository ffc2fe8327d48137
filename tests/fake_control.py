"""A fake supervisor for the console's tests: the control API's protocol (HTTP + JSON on a Unix
socket) with fixed data, every write recorded, and a switch to go away and come back."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from appliance.supervisor.schema import (
    Cache,
    Diff,
    Events,
    LogLine,
    Snapshots,
    Status,
    Tuning,
    Xdp,
)

NOW = 1_790_000_000.0  # the fixed "now" of the snapshot tests

# Typed by the control API's schema, so mypy holds the fake to what the supervisor sends (and
# tests/test_control_schema.py checks the decoded answers too).
STATUS: Status = {
    "ready": True, "summary": "serving v12", "degraded": None, "pop": "pop-fra-1",
    "mode": "appliance",
    "snapshot": {"version": 12, "sha256": "9c1ceff91dcb8277aa", "activated": NOW - 3720},
    "sync": {"version": 12, "sha256": "9c1ceff91dcb8277aa", "activated": NOW - 3720,
             "state": "active", "error": "", "origin_problem": "", "failed_version": 0,
             "pinned": 0, "refused": {}},
    "draining": False,
    "components": {
        "engine": {"ok": True, "reason": "", "pid": 4242, "requests_per_second": 151234.0,
                   "latency_us": {"p50": 180.0, "p99": 420.0}, "connections": 812,
                   "draining": False, "restarts": 0},
        "cache": {"ok": True, "reason": "", "ping_ms": 0.12, "used_memory": 52428800,
                  "max_memory": 268435456, "evicted_keys": 3, "connected_clients": 4},
        "xdp": {"ok": True, "reason": "", "attached": {"eth0": "native"}},
    },
    "tuning": {"enabled": True, "checks": 42, "drifting": ["sysctl vm.swappiness"],
               "drift": {"sysctl vm.swappiness": 2}, "repairs": 1, "repairs_skipped": 0,
               "udev_events": 3, "irqbalance": "not running", "error": ""},
}
SNAPSHOTS: Snapshots = {"active": 12, "snapshots": [
    {"version": v, "sha256": f"{v:02d}" + "ab" * 31, "bytes": 1000 * v,
     "created": NOW - 86400 + v * 60, "campaigns": 100_000 + v,
     "activated": NOW - 3720 if v == 12 else None, "active": v == 12,
     "state": "active" if v == 12 else "retained"} for v in (9, 10, 11, 12)]}
TUNING: Tuning = {"status": STATUS["tuning"], "knobs": [
    {"name": "hugepages node0 2M", "group": "hugepages", "current": "512", "desired": "512",
     "status": "ok", "why": ""},
    {"name": "sysctl vm.swappiness", "group": "sysctl", "current": "60", "desired": "10",
     "status": "drift", "why": ""},
    {"name": "irq 38 eth0", "group": "irq", "current": "2", "desired": "2", "status": "ok",
     "why": "virtio2-input.0 → shard CPU (queue 0)"},
    {"name": "irq 40 eth0", "group": "irq", "current": "0-3", "desired": "3",
     "status": "kernel-owned", "why": ""}]}
XDP: Xdp = {"loaded": True, "pin_dir": "/sys/fs/bpf/adpop",
       "attached": {"eth0": {"mode": "native"}},
       "blocklist": {"ipv4": 100_000, "ipv6": 12},
       "counters": {"pass": {"packets": 9_876_543, "bytes": 5_000_000_000},
                    "blocked": {"packets": 12_345, "bytes": 740_700},
                    "rate": {"packets": 6_789, "bytes": 434_496},
                    "port": {"packets": 321, "bytes": 19_260},
                    "malformed": {"packets": 7, "bytes": 420},
                    "fragment": {"packets": 0, "bytes": 0}},
       "top": [{"source": "198.18.7.7", "drops": 6789}, {"source": "198.18.5.1", "drops": 4000}],
       "rate_pps": 20000, "burst": 100}
EVENTS: Events = {"closed_segments": 3, "backlog_bytes": 1_572_864}
CACHE: Cache = {"address": "127.0.0.1:6379", "ok": True, "reason": "", "ping_ms": 0.12,
                 "used_memory": 52428800, "max_memory": 268435456, "evicted_keys": 3,
                 "connected_clients": 4}
LOGS: list[LogLine] = [
    {"time": NOW - 60 + i, "level": level, "component": component, "message": message}
        for i, (level, component, message) in enumerate([
            ("info", "supervisor", "ready: serving v12"),
            ("warning", "tuning", "tuning drift (sysctl vm.swappiness) after interval; repairing"),
            ("info", "tuning", "repair: adpop-tune.service re-applied the tuning"),
            ("info", "control", "control: sync now by uid 1000"),
            ("info", "sync", "v12 active")])]
DIFF: Diff = {"from": 11, "to": 12, "added": ["camp-9"], "removed": [],
              "changed": ["camp-1", "camp-2"]}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeControl]:
    """A running fake supervisor on a socket in tmp_path."""
    backend = FakeControl(tmp_path / "control.sock")
    backend.start()
    yield backend
    backend.close()


class FakeControl:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes: list[tuple[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _app(self) -> web.Application:
        app = web.Application()
        reads = {"/v1/status": STATUS, "/v1/snapshots": SNAPSHOTS, "/v1/tuning": TUNING,
                 "/v1/xdp": XDP, "/v1/events": EVENTS, "/v1/snapshots/diff": DIFF,
                 "/v1/cache": CACHE}

        def read(body: Any) -> Any:
            async def handler(request: web.Request) -> web.Response:
                return web.json_response(body)
            return handler

        async def logs(request: web.Request) -> web.Response:
            return web.json_response({"lines": LOGS})

        async def record(request: web.Request) -> web.Response:
            body = json.loads(await request.text()) if request.can_read_body else None
            self.writes.append((request.path, body))
            return web.json_response({"ok": True, "message": f"done: {request.path}"})

        for route, body in reads.items():
            app.router.add_get(route, read(body))
        app.router.add_get("/v1/logs", logs)
        for route in ("/v1/sync-now", "/v1/rollback", "/v1/drain", "/v1/undrain",
                      "/v1/tuning/apply", "/v1/xdp/block", "/v1/xdp/unblock"):
            app.router.add_post(route, record)
        return app

    def start(self) -> None:
        async def up() -> None:
            self.runner = web.AppRunner(self._app())
            await self.runner.setup()
            await web.UnixSite(self.runner, str(self.path)).start()
        asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)

    def stop(self) -> None:
        async def down() -> None:
            if self.runner is not None:
                await self.runner.cleanup()
                self.runner = None
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
