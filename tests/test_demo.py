"""`make demo`'s script runs end to end: keys, build, verify, install, one engine decision."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_script_serves_a_decision() -> None:
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO,
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "ok: version" in out and "installed and activated version" in out
    answer = out.split("engine answered GET", 1)[1].split("\n", 1)[1]
    decision = json.loads(answer[: answer.index("\n}\n") + 2])
    assert decision["placements"][0]["ads"], "the sample campaigns should fill the demo request"
    # The demo stops the engine it started.
    running = subprocess.run(["pgrep", "-af", "adpop-engine"], capture_output=True, text=True,
                             check=False)
    assert ".demo/state/current" not in running.stdout
