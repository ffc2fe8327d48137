"""End to end on `adpop up`: a real origin, redis-server, the engine and the supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.supervisor.client import ControlError, call
from appliance.up import free_port

REPO = Path(__file__).resolve().parent.parent


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes only once reaped; read its state.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


class Up:
    def __init__(self, state: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.state, self.port, self.process = state, port, process
        self.control = str(state / "pop" / "control.sock")

    def status(self) -> dict[str, Any]:
        return call(self.control, "GET", "/v1/status")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def decide(self) -> dict[str, Any]:
        body = json.dumps({"id": "e2e", "placements": [{"id": "article-inline"}],
                           "geo": {"country": "US"}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/decide", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            answer: dict[str, Any] = json.loads(r.read())
            return answer

    def adpop(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=REPO,
                              capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    state, port = tmp_path / "up", free_port()
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - closed after the process
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "up", "--state",
                                str(state), "--port", str(port)], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        wait_for("up.json", lambda: (state / "up.json").exists() or process.poll() is not None,
                 120)
        assert process.poll() is None, (tmp_path / "up.log").read_text()
        yield Up(state, port, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        log.close()


def test_a_whole_pop_serves_updates_heals_drains_and_stops_clean(up: Up) -> None:
    info = json.loads((up.state / "up.json").read_text())
    assert info["serving_url"] == f"http://127.0.0.1:{up.port}"
    status = up.status()
    assert status["ready"] and status["snapshot"]["version"] == 1
    assert status["components"]["engine"]["ok"] and status["components"]["cache"]["ok"]
    assert up.decide()["placements"][0]["ads"], "the sample campaigns fill article-inline"

    # Dev mode leaves the host's tuning alone, but shows what the plan would be.
    tuning = call(up.control, "GET", "/v1/tuning")
    assert tuning["status"]["enabled"] is False and tuning["knobs"]
    assert {"name", "current", "desired", "status"} <= set(tuning["knobs"][0])
    with pytest.raises(ControlError, match="tuning_off"):
        call(up.control, "POST", "/v1/tuning/apply")
    # XDP: nothing attached on a dev host; a bad CIDR is refused before anything is written.
    assert call(up.control, "GET", "/v1/xdp")["loaded"] is False
    with pytest.raises(ControlError, match=r"did you mean 198\.18\.0\.0/24"):
        call(up.control, "POST", "/v1/xdp/block", {"cidrs": ["198.18.0.1/24"]})

    # Version 2 at the origin reaches the PoP by itself.
    origin_toml = str(up.state / "origin.toml")
    up.adpop("origin", "campaigns", "pause", "house-fallback", "--config", origin_toml)
    up.adpop("origin", "publish", "--config", origin_toml)
    # Served, and past its health window (a failure inside it would revert to v1).
    wait_for("v2 served", lambda: up.decide()["version"] == 2
             and (s := up.status())["sync"]["version"] == 2 and s["sync"]["state"] == "active")

    # kill -9 of the engine: the supervisor starts another, and serving resumes.
    engine_pid = up.status()["components"]["engine"]["pid"]
    os.kill(engine_pid, signal.SIGKILL)
    wait_for("a new engine", lambda: (s := up.status())["components"]["engine"]["ok"]
             and s["components"]["engine"]["pid"] not in (None, engine_pid))
    assert up.decide()["version"] == 2
    assert up.status()["components"]["engine"]["restarts"] >= 1

    # A frozen cache: degraded with the reason, then recovery once it answers again.
    cache_pid = up.status()["components"]["cache"]["pid"]
    os.kill(cache_pid, signal.SIGSTOP)
    try:
        degraded = wait_for("degraded", lambda: (s := up.status())["ready"] is False and s)
        assert "cache" in degraded["summary"] and "not answering" in degraded["summary"]
    finally:
        os.kill(cache_pid, signal.SIGCONT)
    wait_for("recovered", lambda: up.status()["ready"])

    # Drain: healthz says 503 to the balancer; a request in flight (half sent when the drain
    # began) is still answered.
    held = socket.create_connection(("127.0.0.1", up.port), timeout=10)
    held.sendall(b"GET /v1/decide?id=h&placement=article-inline&country=US HTTP/1.1\r\n")
    assert "draining" in up.adpop("drain", "--socket", up.control)
    assert up.get("/healthz")[0] == 503
    held.sendall(b"Host: x\r\n\r\n")
    assert held.recv(65536).startswith(b"HTTP/1.1 200")
    held.close()
    up.adpop("undrain", "--socket", up.control)
    assert up.get("/healthz")[0] == 200

    # SIGTERM to `adpop up`: nothing it started is left.
    pids = [info["pids"]["origin"], info["pids"]["supervisor"],
            up.status()["components"]["engine"]["pid"], cache_pid]
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(30) == 0
    wait_for("every process gone", lambda: not any(alive(p) for p in pids), 15)


def test_bad_campaign_folder_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "up", "--state",
                             str(tmp_path), "--campaigns", str(tmp_path / "none")], cwd=REPO,
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
