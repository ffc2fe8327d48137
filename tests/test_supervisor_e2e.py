"""End to end on `adpop up`: a real origin, redis-server, the engine and the supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.supervisor.client import ControlError, call
from appliance.supervisor.components import alive
from tests.up_harness import Up, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


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


def test_an_operators_rollback_is_a_pin_and_a_refusal_is_logged_as_one(up: Up) -> None:
    """Rolled back by hand, the PoP shows "pinned to vN by operator until the next publish":
    no refusal, no error, no failure at the origin, until a newer version comes. A refused
    write is logged as refused, never as done."""
    with pytest.raises(ControlError, match="no retained version below v1"):
        call(up.control, "POST", "/v1/rollback", {})
    lines = [line["message"] for line in call(up.control, "GET", "/v1/logs")["lines"]]
    refused = [line for line in lines if "rollback" in line and "uid" in line]
    assert refused and all(" refused for uid " in line for line in refused), refused

    origin_toml = str(up.state / "origin.toml")
    up.adpop("origin", "campaigns", "pause", "house-fallback", "--config", origin_toml)
    up.adpop("origin", "publish", "--config", origin_toml)
    wait_for("v2 active", lambda: (s := up.status())["sync"]["version"] == 2
             and s["sync"]["state"] == "active")
    assert "pinned by operator" in up.adpop("rollback", "--socket", up.control)
    for _ in range(3):  # syncs that see v2 at the origin again keep the pin, quietly
        call(up.control, "POST", "/v1/sync-now")
        time.sleep(1)
    sync = up.status()["sync"]
    assert sync["state"] == "pinned" and sync["pinned"] == 1 and not sync["error"], sync
    assert sync["refused"] == {}
    shown = up.adpop("status", "--socket", up.control)
    assert "PIN  pinned to v1 by operator until the next publish" in shown
    fleet = json.loads(up.adpop("origin", "fleet", "--json", "--config", origin_toml))
    assert [(p["failures"], p["state"]) for p in fleet["pops"]] == [(0, "pinned")], fleet

    up.adpop("origin", "campaigns", "resume", "house-fallback", "--config", origin_toml)
    up.adpop("origin", "publish", "--config", origin_toml)
    wait_for("v3 active, the pin gone", lambda: (s := up.status())["sync"]["version"] == 3
             and s["sync"]["state"] == "active" and not s["sync"]["pinned"])
