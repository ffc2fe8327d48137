"""The console's CPU use: `adpop console --refresh 1` in a real terminal (a pty) for 60 s
against a PoP from `adpop up`, its user + system CPU divided by the wall time (goal < 5% of
a core). Beside it, the same 60 s of the supervisor it reads from, measured in the same run.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.up import free_port
from bench.bench_engine import cpu_seconds

SECONDS = 60
GOAL = 5.0
REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "up"
        up = subprocess.Popen([sys.executable, "-m", "appliance.cli", "up", "--state",
                               str(state), "--port", str(free_port())], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (state / "up.json").exists():
                if up.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("adpop up did not come up")
                time.sleep(0.2)
            info = json.loads((state / "up.json").read_text())
            pid, fd = pty.fork()
            if pid == 0:
                os.environ.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
                os.execv(sys.executable, [sys.executable, "-m", "appliance.cli", "console",
                                          "--socket", info["control_socket"], "--refresh", "1"])
            supervisor = info["pids"]["supervisor"]
            time.sleep(3)  # start-up is not steady state
            console_before, sup_before = cpu_seconds([pid]), cpu_seconds([supervisor])
            started = time.monotonic()
            while time.monotonic() - started < SECONDS:  # drain the terminal it draws on
                ready, _, _ = select.select([fd], [], [], 0.5)
                if ready:
                    os.read(fd, 65536)
            wall = time.monotonic() - started
            console = (cpu_seconds([pid]) - console_before) / wall * 100
            sup = (cpu_seconds([supervisor]) - sup_before) / wall * 100
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            os.close(fd)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(30)
    print(f"console CPU at a 1 s refresh over {SECONDS} s: {console:.2f}% of a core "
          f"(goal < {GOAL:.0f}%) [{'met' if console < GOAL else 'NOT met'}]; the supervisor "
          f"it reads from, same window: {sup:.2f}%")


if __name__ == "__main__":
    main()
