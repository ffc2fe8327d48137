"""sd_notify against a real NOTIFY_SOCKET: the test binds the datagram socket systemd would
and reads every message the supervisor sends.

The readiness tests run the real supervisor (dev mode: redis-server and the engine as its
children) against a real origin that the test starts late, or never. The watchdog test runs
the health loop in-process with one part whose probe hangs, because only there can the loop
be blocked while the rest of the event loop keeps running.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.config import Scope, load
from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.store import SnapshotStore
from appliance.supervisor.components import ChildProcess, Component, Health
from appliance.supervisor.core import Supervisor
from appliance.up import REPO, SAMPLE_CAMPAIGNS, free_port, prepare

pytestmark = pytest.mark.integration


@dataclass
class NotifySocket:
    """The systemd end of sd_notify: a bound datagram socket and what arrived on it."""

    path: Path
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return list(self.messages)

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.snapshot() if key in m]

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.with_key(key)
            if found:
                return found[0][1]
            time.sleep(0.1)
        raise AssertionError(f"no {key} in {timeout} s; got {self.snapshot()[-5:]}")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


@dataclass
class Pop:
    state: Path
    origin_toml: Path
    pop_toml: Path
    port: int


def make_pop(tmp_path: Path, ready_timeout: str) -> Pop:
    state, port = tmp_path / "pop", free_port()
    origin_toml, pop_toml, _ = prepare(state, SAMPLE_CAMPAIGNS, port)
    drop_in = pop_toml.with_name("appliance.d") / "50-test.toml"
    drop_in.parent.mkdir()
    drop_in.write_text(f'[sync]\npoll_interval = "1s"\n[supervisor]\n'
                       f'ready_timeout = "{ready_timeout}"\n')
    return Pop(state, origin_toml, pop_toml, port)


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "appliance.cli", *argv], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def supervisor_env(notify: NotifySocket) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    return {**env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return int(r.status)
    except OSError:
        return 0


def test_ready_only_once_the_pop_serves(tmp_path: Path, notify_socket: NotifySocket) -> None:
    pop = make_pop(tmp_path, ready_timeout="5m")
    supervisor = start(["supervisor", "--config", str(pop.pop_toml)], tmp_path / "sup.log",
                       supervisor_env(notify_socket))
    origin = None
    try:
        # No origin yet: the cache comes up, the engine waits, STATUS says so, no READY.
        deadline = time.monotonic() + 60
        while True:
            statuses = [m["STATUS"] for _, m in notify_socket.with_key("STATUS")]
            if statuses and "cache" not in statuses[-1]:
                break
            assert time.monotonic() < deadline, statuses[-3:]
            time.sleep(0.2)
        time.sleep(3)  # several health rounds with the cache healthy and no snapshot
        assert not notify_socket.with_key("READY")
        last = notify_socket.with_key("STATUS")[-1][1]["STATUS"]
        assert last.startswith("starting (no snapshot): ")
        assert "engine waits for a first verified snapshot" in last
        assert "no verified snapshot yet" in last
        assert healthz(pop.port) == 0

        origin = start(["origin", "serve", "--config", str(pop.origin_toml)],
                       tmp_path / "origin.log")
        ready = notify_socket.wait_for("READY", 90)
        assert ready["READY"] == "1" and ready["STATUS"] == "serving v1"
        # READY came after the conditions: the engine answers and v1 is active.
        assert healthz(pop.port) == 200
        store = SnapshotStore(pop.state / "pop", keep=5)
        assert store.current_version() == 1
        time.sleep(2.5)
        assert len(notify_socket.with_key("READY")) == 1  # once, not every round
        pings = [t for t, m in notify_socket.with_key("WATCHDOG")]
        assert len(pings) >= 3 and all(m.get("STATUS") for _, m in notify_socket.with_key(
            "STATUS"))
    finally:
        stop(supervisor)
        if origin is not None:
            stop(origin)
    stopping = notify_socket.with_key("STOPPING")
    assert stopping and stopping[-1][1]["STATUS"] == "stopping"


def test_ready_degraded_after_the_timeout_says_what_is_missing(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    pop = make_pop(tmp_path, ready_timeout="2s")
    supervisor = start(["supervisor", "--config", str(pop.pop_toml)], tmp_path / "sup.log",
                       supervisor_env(notify_socket))
    try:
        ready = notify_socket.wait_for("READY", 60)
    finally:
        stop(supervisor)
    status = ready["STATUS"]
    assert status.startswith("degraded (no snapshot): ")
    assert "no verified snapshot yet (origin https://127.0.0.1:" in status
    assert "not reachable" in status
    assert "engine waits for a first verified snapshot" in status


class IdleRunner:
    """A part that is always running; only its probe matters here."""

    description = "test part"

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def refresh(self) -> None: ...
    def running(self) -> bool:
        return True

    def pid(self) -> int | None:
        return None

    def stopped_why(self) -> str:
        return ""

    def waiting(self) -> str:
        return ""

    def crashed(self) -> bool:
        return False

    def config_error(self) -> str:
        return ""


def test_watchdog_stops_while_the_health_loop_is_blocked(
        tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch,
        tuf_root: Path, signing_key: SigningKey) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = tmp_path / "appliance.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[snapshot]\ntrust_root = "{tuf_root}"\n')
    appliance = load(Scope.APPLIANCE, config)
    store = SnapshotStore(tmp_path / "state", keep=3)
    release = asyncio.Event()
    hang = asyncio.Event()

    async def probe() -> Health:
        if hang.is_set():
            await release.wait()  # the health loop is stuck here
        return Health(True)

    supervisor = Supervisor(appliance, store, components=[Component("part", IdleRunner(), probe)])
    ticks: list[float] = []

    async def scenario() -> tuple[int, int, int, int]:
        stop = asyncio.Event()
        loop_task = asyncio.ensure_future(supervisor.health_loop(stop))

        async def ticker() -> None:  # the rest of the event loop, alive throughout
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.1)

        tick_task = asyncio.ensure_future(ticker())
        await asyncio.sleep(1.5)
        before = len(notify_socket.with_key("WATCHDOG"))
        hang.set()
        await asyncio.sleep(0.5)  # a ping may already be on its way
        stuck_from = len(notify_socket.with_key("WATCHDOG"))
        ticks_from = len(ticks)
        await asyncio.sleep(2.0)
        stuck_to = len(notify_socket.with_key("WATCHDOG"))
        ticks_during = len(ticks) - ticks_from
        hang.clear()
        release.set()
        await asyncio.sleep(1.5)
        after = len(notify_socket.with_key("WATCHDOG")) - stuck_to
        stop.set()
        await asyncio.gather(loop_task, tick_task)
        return before, stuck_to - stuck_from, ticks_during, after

    before, while_stuck, ticks_during, after = asyncio.run(scenario())
    time.sleep(0.3)  # the reader thread drains the socket
    assert before >= 4, "pings every 0.2 s while the loop runs"
    assert while_stuck == 0, "no WATCHDOG=1 while the health loop is blocked"
    assert ticks_during >= 10, "the event loop itself kept running"
    assert after >= 4, "pings resume once the loop is free"


JOURNAL_PROBE = """
import logging, os, socket
os.makedirs("/run/systemd/journal")
sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sink.bind("/run/systemd/journal/socket")
sink.settimeout(10)
os.environ["INVOCATION_ID"] = "0123456789abcdef0123456789abcdef"  # as systemd sets it
from appliance.supervisor.notify import setup_logging
context, recent = setup_logging()
context.snapshot_version = 7
logging.getLogger("adpop.supervisor.control").info(
    "drain asked", extra={"component": "control", "operator_uid": 1234})
print(sink.recv(65536).decode())
"""


def test_logs_reach_journald_with_structured_fields() -> None:
    """Under systemd the records go to journald's native socket, which the test owns: a
    tmpfs over /run/systemd in a private mount namespace, with the socket bound on it."""
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs tmpfs /run/systemd && exec "{sys.executable}" -c "$0"',
         JOURNAL_PROBE], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert fields["MESSAGE"] == "drain asked"
    assert fields["COMPONENT"] == "control" and fields["SNAPSHOT_VERSION"] == "7"
    assert fields["OPERATOR_UID"] == "1234" and fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "adpop-supervisor"


def test_a_spool_backlog_is_degraded_but_ready(
        tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch,
        tuf_root: Path) -> None:
    """Closed segments past engine.spool_warn_bytes: degraded with the reason named, in the
    status, STATUS= and the control API's events, while READY=1 still goes out (it serves)."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    config = tmp_path / "appliance.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[snapshot]\ntrust_root = "{tuf_root}"\n'
                      '[engine]\nspool = "spool"\nspool_warn_bytes = "4MiB"\n')
    appliance = load(Scope.APPLIANCE, config)
    store = SnapshotStore(tmp_path / "state", keep=3)
    folder = tmp_path / "state" / "spool"
    folder.mkdir(parents=True)
    (folder / "shard-0-1-1.spool").write_bytes(b"\0" * (8 << 20))  # open: not counted

    async def healthy() -> Health:
        return Health(True)

    supervisor = Supervisor(appliance, store, components=[Component("part", IdleRunner(),
                                                                    healthy)])
    monkeypatch.setattr(supervisor, "missing", list)  # nothing else missing
    segments = [folder / f"shard-0-1-{number}.closed" for number in (2, 3, 4)]
    for segment in segments:
        with open(segment, "wb") as out:
            out.truncate(2 << 20)  # 6 MiB closed in all
    asyncio.run(supervisor.health_round())
    status = supervisor.status()
    assert status["events"] == {
        "ok": False, "closed_segments": 3, "backlog_bytes": 6 << 20, "warn_bytes": 4 << 20,
        "reason": "events: spool backlog 6 MiB passes engine.spool_warn_bytes (4 MiB)",
        "shedding": False, "shipping": {}}
    assert status["summary"].startswith("degraded (no snapshot): events: spool backlog 6 MiB")
    assert status["degraded"] == status["events"]["reason"]
    ready = notify_socket.wait_for("READY", 5)
    assert ready["STATUS"] == status["summary"], "READY=1 still sent, degraded named"
    segments[0].unlink()  # archived by the operator: 4 MiB is not past the warning
    asyncio.run(supervisor.health_round())
    assert supervisor.summary == "serving no snapshot" and supervisor.status()["events"]["ok"]


def test_a_part_that_refuses_its_configuration_is_reported_not_restarted(
        tmp_path: Path) -> None:
    """Case 6: the real engine given a flag it refuses exits 2 with one line; the
    component says that line and never starts it again."""
    engine = Path(__file__).resolve().parent.parent / "engine" / "build" / "adpop-engine"
    log = tmp_path / "engine.log"
    runner = ChildProcess([str(engine), "--snapshot", str(tmp_path), "--shards", "0"], log,
                          config_status=2)
    clock = [0.0]

    async def healthy() -> Health:
        return Health(True)

    part = Component("engine", runner, healthy, clock=lambda: clock[0])

    async def scenario() -> list[Health]:
        seen = []
        for _ in range(6):
            seen.append(await part.health())
            if runner.process is not None:
                await runner.process.wait()
            clock[0] += 60.0  # past any backoff
        return seen

    seen = asyncio.run(scenario())
    assert log.read_text().count("adpop-engine: --shards: expected a number") == 1
    assert "refuses its configuration: adpop-engine: --shards: expected a number from 1 " \
        "to 1024, got '0' (see --help); fix the configuration" in seen[-1].reason
    assert part.restarts == 0


def test_a_sync_loop_that_dies_is_named_and_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tuf_root: Path) -> None:
    """Case 6: a sync loop that ended by itself left the PoP saying ready."""
    config = tmp_path / "appliance.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[snapshot]\ntrust_root = "{tuf_root}"\n')
    store = SnapshotStore(tmp_path / "state", keep=3)

    async def healthy() -> Health:
        return Health(True)

    supervisor = Supervisor(load(Scope.APPLIANCE, config), store,
                            components=[Component("part", IdleRunner(), healthy)])
    runs: list[int] = []

    async def run(stop: asyncio.Event) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        await stop.wait()

    monkeypatch.setattr(supervisor.agent, "run", run)

    async def scenario() -> list[str]:
        stop = asyncio.Event()
        supervisor.stop = stop
        supervisor.sync_task = asyncio.ensure_future(supervisor.agent.run(stop))
        await asyncio.sleep(0.05)
        await supervisor.health_round()
        gaps = supervisor.missing()
        stop.set()
        await supervisor.sync_task
        return gaps

    gaps = asyncio.run(scenario())
    assert "sync stopped: RuntimeError('boom')" in gaps
    assert len(runs) == 2
