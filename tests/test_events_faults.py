"""Exactly once, through faults (issue 23's acceptance): one origin and three whole PoPs on
loopback (dev mode: each with its engine, cache and supervisor), a bounded load firing
decisions, then every impression URL and a share of click URLs, counting the 204s and 302s
it got. Meanwhile each engine is killed -9 twice, a supervisor twice while it ships, the
origin once while batches arrive, and the origin is stopped for 30 s. Afterwards the
origin's report holds exactly as many impressions as 204s, clicks as 302s, and decisions
with ads as answers that carried ads, per PoP. The same over NATS JetStream, with one node
of a three-node cluster killed during the run."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.supervisor.client import ControlError, call
from appliance.up import free_port, root_json
from tests.nats_harness import Cluster, nats_servers
from tests.test_origin_e2e import origin_tls

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ADPOP = [sys.executable, "-m", "appliance.cli"]
ENGINE = REPO / "engine" / "build" / "adpop-engine"
POPS = ("pop-a", "pop-b", "pop-c")
LOAD_SECONDS = 65.0  # the load runs this long, over every fault below...
LOAD_DECISIONS = 2500  # ...and stops early at this many decisions per PoP


def adpop(*args: str) -> str:
    done = subprocess.run([*ADPOP, *args], capture_output=True, text=True, cwd=REPO,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Pop:
    name: str
    state: Path
    conf: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    # What the load got back: the truth the origin's report must match.
    answered_with_ads: int = 0
    impressions: int = 0  # 204s
    clicks: int = 0  # 302s
    retries: Counter[str] = field(default_factory=Counter)

    @property
    def control(self) -> str:
        return str(self.state / "control.sock")


class World:
    def __init__(self, tmp: Path, nats: Cluster | None, pops: tuple[str, ...] = POPS,
                 pop_extra: str = "", campaigns: Path = REPO / "config" / "campaigns",
                 origin_extra: str = "") -> None:
        self.tmp = tmp
        self.nats = nats
        self.origin_port = free_port()
        self.origin_conf = tmp / "origin.toml"
        events = (f'[events]\ntransport = "nats"\nnats_url = "{nats.urls}"\n'
                  f'nats_replicas = 3\ningest_workers = 2\n' if nats else "")
        self.origin_conf.write_text(
            f'[origin]\nlisten = "127.0.0.1:{self.origin_port}"\n'
            f'state_dir = "{tmp / "origin"}"\n[rollout]\nstage_timeout = "1m"\n' + events
            + origin_extra)
        adpop("origin", "keys", "init", "--config", str(self.origin_conf))
        adpop("origin", "tokens", "create", "e2e", "--role", "read", "--out",
              str(tmp / "operator-token"), "--config", str(self.origin_conf))
        adpop("origin", "campaigns", "import", str(campaigns), "--config", str(self.origin_conf))
        adpop("origin", "publish", "--config", str(self.origin_conf))
        self.origin: subprocess.Popen[bytes] | None = None
        self.pop_extra = pop_extra  # more TOML for every PoP's configuration
        self.pops = [self._pop(name) for name in pops]

    def _pop(self, name: str) -> Pop:
        state = self.tmp / name
        state.mkdir()
        adpop("origin", "pops", "enroll", name, "--out", str(state / "enroll-token"),
              "--config", str(self.origin_conf))
        port = free_port()
        conf = self.tmp / f"{name}.toml"
        events = (f'[events]\ntransport = "nats"\nnats_url = "{self.nats.urls}"\n'
                  if self.nats else "")
        conf.write_text(f"""[pop]
id = "{name}"
[paths]
state_dir = "{state}"
[sync]
origin_url = "https://127.0.0.1:{self.origin_port}"
push_listen = "127.0.0.1:{free_port()}"
poll_interval = "2s"
health_window = "1s"
[engine]
binary = "{ENGINE}"
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{free_port()}"
admin_socket = "engine.sock"
[cache]
address = "127.0.0.1:{free_port()}"
binary = "{shutil.which("redis-server") or "/usr/bin/redis-server"}"
[supervisor]
mode = "dev"
control_socket = "control.sock"
operator_group = ""
ready_timeout = "1m"
{events}{self.pop_extra}""")
        adpop("pop", "trust", str(root_json(self.tmp / "origin")), "--config", str(conf))
        return Pop(name, state, conf, port)

    # --- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as log:
            return subprocess.Popen([*ADPOP, *argv], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def start_origin(self) -> None:
        self.origin = self._spawn("origin", ["origin", "serve", "--config",
                                             str(self.origin_conf)])

    def kill_origin(self, sig: int = signal.SIGKILL) -> None:
        assert self.origin is not None
        self.origin.send_signal(sig)
        self.origin.wait(30)
        self.origin = None

    def start_supervisor(self, pop: Pop) -> None:
        # --keep-parts: the engine and cache outlive a killed supervisor, and the next one
        # adopts them (as systemd's units do in the appliance).
        pop.process = self._spawn(pop.name, ["supervisor", "--keep-parts", "--config",
                                             str(pop.conf)])

    def kill_supervisor(self, pop: Pop) -> None:
        assert pop.process is not None
        pop.process.send_signal(signal.SIGKILL)
        pop.process.wait(10)

    def bounce_supervisor(self, pop: Pop) -> None:
        """kill -9 of the supervisor (while it ships), and a new one a second later."""
        self.kill_supervisor(pop)
        time.sleep(1)
        self.start_supervisor(pop)

    def bounce_origin(self) -> None:
        """kill -9 of the origin while batches arrive, and a new one at once."""
        self.kill_origin()
        self.start_origin()

    def status(self, pop: Pop) -> dict[str, Any]:
        return call(pop.control, "GET", "/v1/status")

    def kill_engine(self, pop: Pop) -> None:
        """kill -9 of the engine, once it serves (a supervisor just restarted is asked
        until it answers)."""
        self.wait_ready(pop)
        pid = self.status(pop)["components"]["engine"]["pid"]
        os.kill(pid, signal.SIGKILL)

    def wait_ready(self, pop: Pop, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.status(pop)["ready"]:
                    return
            except ControlError:
                pass
            assert time.monotonic() < deadline, (self.tmp / f"{pop.name}.log").read_text()[-3000:]
            time.sleep(0.2)

    def stop_all(self) -> None:
        for pop in self.pops:
            if pop.process is not None and pop.process.poll() is None:
                pop.process.send_signal(signal.SIGTERM)
                try:
                    pop.process.wait(30)
                except subprocess.TimeoutExpired:
                    pop.process.kill()
            # Parts kept past the supervisor (--keep-parts) are stopped by their pid files.
            for pid_file in (pop.state / "run").glob("*.pid"):
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        if self.origin is not None and self.origin.poll() is None:
            self.kill_origin(signal.SIGTERM)

    # --- what the origin reports ----------------------------------------------------------

    def report(self, by: str = "pop") -> dict[str, dict[str, Any]]:
        token = (self.tmp / "operator-token").read_text().strip()
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.origin_port}/v1/reports?by={by}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10,
                                    context=origin_tls(self.tmp / "origin")) as resp:
            return {row["key"]: row for row in json.loads(resp.read())["rows"]}


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    if request.param == "nats":
        with nats_servers(tmp_path / "nats", 3) as cluster:
            w = World(tmp_path, cluster)
            try:
                yield w
            finally:
                w.stop_all()
    else:
        w = World(tmp_path, None)
        try:
            yield w
        finally:
            w.stop_all()


# --- the load -------------------------------------------------------------------------------


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _decide(port: int, request_id: str) -> dict[str, Any] | None:
    body = json.dumps({"id": request_id, "placements": [{"id": "article-inline"}],
                       "geo": {"country": "US"}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/v1/decide", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        answer: dict[str, Any] = json.loads(data)
        return answer if resp.status == 200 else None
    finally:
        conn.close()


def _until(pop: Pop, kind: str, action: Any, stop_at: float) -> Any:
    """`action()` until it succeeds (None or an exception is a failure: the engine restarts,
    the connection dropped); every pixel is fired until the engine acknowledges it."""
    while True:
        try:
            result = action()
            if result is not None:
                return result
        except (OSError, http.client.HTTPException, ValueError):
            pass
        pop.retries[kind] += 1
        assert time.monotonic() < stop_at, f"{pop.name}: {kind} never answered"
        time.sleep(0.05)


def load(pop: Pop, stop: threading.Event, rng: random.Random) -> None:
    deadline = time.monotonic() + LOAD_SECONDS
    for n in range(LOAD_DECISIONS):
        if stop.is_set() or time.monotonic() > deadline:
            return
        give_up = time.monotonic() + 60
        answer = _until(pop, "decide", lambda n=n: _decide(pop.port, f"{pop.name}-r{n}-"
                                                           f"{rng.getrandbits(32):08x}"),
                        give_up)
        ads = [ad for p in answer["placements"] for ad in p["ads"]]
        if not ads:
            continue
        pop.answered_with_ads += 1
        for ad in ads:
            _until(pop, "impression",
                   lambda ad=ad: True if _get(pop.port, ad["imp"]) == 204 else None, give_up)
            pop.impressions += 1
            if rng.random() < 0.3:
                _until(pop, "click",
                       lambda ad=ad: True if _get(pop.port, ad["click"]) == 302 else None,
                       give_up)
                pop.clicks += 1
        time.sleep(0.02)  # the load is spread over the faults, not over in seconds


@pytest.mark.parametrize("world", ["http", "nats"], indirect=True)
def test_every_event_reaches_the_origin_exactly_once_through_faults(
        world: World, rng: random.Random) -> None:
    world.start_origin()
    for pop in world.pops:
        world.start_supervisor(pop)
    for pop in world.pops:
        world.wait_ready(pop)
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(pop, stop, random.Random(rng.random())))
               for pop in world.pops]
    for t in threads:
        t.start()
    a, b, c = world.pops
    try:
        # Each engine twice, a supervisor twice while it ships, the origin killed once and
        # stopped for 30 s: spread over the load.
        plan: list[tuple[float, Any]] = [
            (3, lambda: world.kill_engine(a)), (5, lambda: world.kill_engine(b)),
            (7, lambda: world.kill_engine(c)),
            (9, lambda: world.bounce_supervisor(a)),
            (12, world.bounce_origin),
            (16, lambda: world.kill_engine(a)), (18, lambda: world.kill_engine(b)),
            (20, lambda: world.kill_engine(c)),
            (22, lambda: world.bounce_supervisor(a)),
            (25, lambda: world.kill_origin(signal.SIGTERM)),
            (55, world.start_origin),
        ]
        if world.nats is not None:
            plan.append((30, world.nats.nodes[1].kill))
        started = time.monotonic()
        for at, fault in plan:
            time.sleep(max(0.0, started + at - time.monotonic()))
            fault()
    finally:
        for t in threads:
            t.join(180)
    assert not any(t.is_alive() for t in threads)
    assert sum(p.answered_with_ads for p in world.pops) > 100, "the load should fill"

    expected = {p.name: (p.answered_with_ads, p.impressions, p.clicks) for p in world.pops}
    deadline = time.monotonic() + 180
    while True:
        try:
            got = {name: (row["with_ads"], row["impressions"], row["clicks"])
                   for name, row in world.report().items()}
        except OSError:
            got = {}
        if got == expected:
            break
        assert time.monotonic() < deadline, f"report {got} != load {expected}"
        time.sleep(1)
    time.sleep(3)  # nothing more arrives: none doubled
    got = {name: (row["with_ads"], row["impressions"], row["clicks"])
           for name, row in world.report().items()}
    assert got == expected
    for pop in world.pops:
        assert not list((pop.state / "engine" / "spool" / "refused").glob("*")), pop.name
        # The faults were felt: requests retried across engine restarts, and (over HTTP)
        # deliveries failed while the origin was stopped.
        assert pop.retries["decide"] + pop.retries["impression"] > 0, pop.name
        if world.nats is None:
            assert world.status(pop)["events"]["shipping"]["failures"] > 0, pop.name
    print({p.name: (expected[p.name], dict(p.retries)) for p in world.pops})


def test_a_full_spool_sheds_until_the_origin_is_back_and_loses_nothing(
        tmp_path: Path) -> None:
    """Disk full (issue 23's acceptance): the spool on a small tmpfs and the origin stopped;
    the engine sheds with spool_full, every acknowledged event still reaches the origin
    once, and serving resumes by itself once the origin is back and the backlog drains."""
    world = World(tmp_path, None, ("pop-d",))
    pop = world.pops[0]
    spool = pop.state / "engine" / "spool"
    spool.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)], check=True)
    try:
        world.start_origin()
        world.start_supervisor(pop)
        world.wait_ready(pop)
        world.kill_origin(signal.SIGTERM)
        shed = 0
        give_up = time.monotonic() + 120
        for n in range(40_000):  # bounded: far more than 1 MiB of records
            answer = _until(pop, "decide", lambda n=n: _decide(pop.port, f"full-{n}"), give_up)
            if answer.get("no_fill") == "spool_full":
                shed += 1
                if shed >= 20:
                    break
                continue
            ads = [ad for p in answer["placements"] for ad in p["ads"]]
            if ads:
                pop.answered_with_ads += 1
            for ad in ads:
                code = _get(pop.port, ad["imp"])
                assert code in (204, 503)
                pop.impressions += code == 204
        assert shed >= 20, "the spool never filled"
        # The supervisor's next health round says so: degraded, yet ready.
        deadline = time.monotonic() + 30
        while not (status := world.status(pop))["events"].get("shedding"):
            assert time.monotonic() < deadline, status["events"]
            time.sleep(0.5)
        assert "spool full" in status["events"]["reason"] and "spool full" in status["summary"]
        assert status["ready"], "shedding degrades the PoP; it still serves"

        world.start_origin()
        deadline = time.monotonic() + 120
        while True:
            answer = _decide(pop.port, "after") or {"no_fill": "spool_full"}
            if answer.get("no_fill") != "spool_full":
                # Served (and recorded) again: counted like the others.
                pop.answered_with_ads += any(p["ads"] for p in answer["placements"])
                break
            assert time.monotonic() < deadline, "serving never resumed"
            time.sleep(0.5)
        while True:
            try:
                row = world.report().get("pop-d", {})
            except OSError:
                row = {}
            if (row.get("with_ads"), row.get("impressions")) == (pop.answered_with_ads,
                                                                 pop.impressions):
                break
            assert time.monotonic() < deadline, f"report {row} != load {pop}"
            time.sleep(1)
    finally:
        world.stop_all()
        subprocess.run(["umount", "-l", str(spool)], check=False)
