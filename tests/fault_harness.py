"""Fault injection against a dev-mode PoP run by `adpop up`: kill -9 at a moment seen on the
file system (inotify, so the kill lands while the moment lasts), bounded load that records
what was answered, and the one check every fault ends with: `current`, the engine and the
origin agree on a version whose files verify."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import select
import signal
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.snapshot.store import SnapshotStore
from appliance.supervisor.client import ControlError
from appliance.supervisor.components import alive
from tests.engine_harness import UnixHTTPConnection
from tests.up_harness import Up, wait_for

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def watching(folder: Path) -> Iterator[int]:
    """An inotify descriptor watching `folder` for names that appear (created or renamed in)."""
    fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert _libc.inotify_add_watch(fd, str(folder).encode(), IN_CREATE | IN_MOVED_TO) >= 0
        yield fd
    finally:
        os.close(fd)


def kill_when(fd: int, wanted: Callable[[str], bool], pid: Callable[[], int],
              timeout: float = 60.0) -> str:
    """Sends SIGKILL to pid() the moment a name `wanted` accepts appears; returns the name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        data = os.read(fd, 65536)
        pos = 0
        while pos < len(data):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, pos)
            name = data[pos + 16:pos + 16 + length].rstrip(b"\0").decode()
            pos += 16 + length
            if wanted(name):
                os.kill(pid(), signal.SIGKILL)
                return name
    raise AssertionError("the moment to kill at never came")


def supervisor_pid(up: Up) -> int:
    """The supervisor `adpop up` runs now (it restarts one that dies)."""
    def find() -> int:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                if int(stat[1]) == up.process.pid and b"supervisor" in cmd and stat[0] != "Z":
                    return int(entry.name)
        return 0
    pid: int = wait_for("a running supervisor", find, 60)
    return pid


def ready(up: Up) -> bool:
    """The supervisor answers and says ready (False while it restarts)."""
    try:
        return bool(up.status()["ready"])
    except ControlError:
        return False


def engine_version(up: Up) -> int:
    """What the engine serves, asked on its own admin socket (the supervisor may be down)."""
    conn = UnixHTTPConnection(str(up.state / "pop" / "engine.sock"), timeout=5)
    try:
        conn.request("GET", "/status")
        return int(json.loads(conn.getresponse().read())["version"])
    finally:
        conn.close()


def origin_view(up: Up) -> dict[str, Any]:
    """The origin's record of this PoP (what it was told)."""
    info = json.loads((up.state / "up.json").read_text())
    tls = ssl.create_default_context(cafile=str(up.state / "origin" / "ca" / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", info["ports"]["origin"], timeout=10,
                                       context=tls)
    token = (up.state / "operator-token").read_text().strip()
    try:
        conn.request("GET", "/v1/fleet", headers={"Authorization": f"Bearer {token}"})
        doc = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    pop: dict[str, Any] = next(p for p in doc["pops"] if p["id"] == "pop-local")
    return pop


def store(up: Up) -> SnapshotStore:
    return SnapshotStore(up.state / "pop")


def agreed(up: Up, expect: int, timeout: float = 90.0) -> None:
    """Waits until `current`, the engine and the origin's record agree on version `expect`,
    with its window done and its files verified."""
    def check() -> int:
        try:
            s = store(up)
            current = s.current_version()
            if current is None or s.trial() is not None or s.check(current):
                return 0
            view = origin_view(up)
            if engine_version(up) != current or view["version"] != current \
                    or view["state"] != "active":
                return 0
            return current
        except (OSError, KeyError, ValueError, ControlError):
            return 0
    wait_for(f"current, the engine and the origin to agree on v{expect}",
             lambda: check() == expect, timeout)


def publish(up: Up, *extra: str) -> int:
    out = up.adpop("origin", "publish", "--config", str(up.state / "origin.toml"), *extra)
    return int(out.split()[1].rstrip(":").lstrip("v"))


@dataclass
class Load:
    """Bounded load from a thread: decisions with ids, optionally clicks of one URL.
    Records the ids answered 200 and every failure that is not the expected kind."""

    up: Up
    click: str = ""  # a click URL to send beside each decision (the "bad traffic")
    answered: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    limit: int = 400_000  # requests at most, whatever the test does
    seconds: float = 600.0  # and for this long at most
    pace: float = 0.001  # a pause after each request: load, not a flood
    thread: threading.Thread | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.up.port, timeout=5)
        body_base = {"placements": [{"id": "article-inline"}], "geo": {"country": "US"}}
        deadline = time.monotonic() + self.seconds
        for i in range(self.limit):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            time.sleep(self.pace)
            rid = f"load-{i}"
            try:
                conn.request("POST", "/v1/decide", json.dumps(dict(body_base, id=rid)),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.answered.append(rid)
                else:
                    self.failures.append(f"{rid}: HTTP {resp.status}")
                if self.click:
                    conn.request("GET", self.click)
                    resp = conn.getresponse()
                    resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{rid}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.up.port, timeout=5)
                time.sleep(0.01)
        conn.close()

    def state(self) -> str:
        alive = self.thread is not None and self.thread.is_alive()
        return (f"load thread {'running' if alive else 'ended'}, {len(self.answered)} "
                f"answered, last failures {self.failures[-3:]}")

    def __enter__(self) -> Load:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(30)


def engine_pid(up: Up) -> int:
    """The engine's pid as its supervisor reports it, once one answers."""
    def find() -> int:
        try:
            pid = int(up.status()["components"]["engine"].get("pid") or 0)
        except ControlError:
            return 0
        return pid if pid and alive(pid) else 0
    pid: int = wait_for("the engine's pid", find, 60)
    return pid
