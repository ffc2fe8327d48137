"""`make demo`'s script brings up a serving PoP and stops clean on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.up import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def test_demo_script_serves_a_decision(tmp_path: Path) -> None:
    state, port = tmp_path / "demo", free_port()
    process = subprocess.Popen(["bash", str(REPO / "scripts" / "demo.sh"), "--state", str(state),
                                "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (state / "up.json").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        info = json.loads((state / "up.json").read_text())
        example = info["example"].split("'")[1]
        with urllib.request.urlopen(example, timeout=10) as resp:
            decision = json.loads(resp.read())
        assert decision["placements"][0]["ads"], "the sample campaigns fill the example request"
        # The status command exactly as printed works from the checkout, venv not activated.
        status = subprocess.run(info["status"], shell=True, cwd=REPO, capture_output=True,
                                text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False)
        assert status.returncode == 0 and "ready - serving v1" in status.stdout, status.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    text = out.decode()
    assert f"http://127.0.0.1:{port}" in text and "adpop status --socket" in text
