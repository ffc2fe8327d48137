"""`adpop up` in the background for end-to-end tests: a real origin, redis-server, the engine
and the supervisor, stopped after the test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.supervisor.client import call
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
