"""`adpop console --ssh USER@HOST`: the remote control socket forwarded to a local one by
OpenSSH (-L local.sock:remote.sock), for as long as the console runs."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from appliance.errors import AdpopError

WAIT = 15.0


class SshError(AdpopError):
    """The forward could not be set up."""


@contextlib.contextmanager
def forward(target: str, remote: str) -> Iterator[str]:
    if not shutil.which("ssh"):
        raise SshError("ssh is not installed", hint="apt install openssh-client")
    with tempfile.TemporaryDirectory(prefix="adpop-console-") as folder:
        local = str(Path(folder) / "control.sock")
        process = subprocess.Popen(
            ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
             "-L", f"{local}:{remote}", target], stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + WAIT
            while not Path(local).exists():
                if process.poll() is not None:
                    err = process.stderr.read().decode().strip() if process.stderr else ""
                    raise SshError(f"ssh to {target} failed: {err or process.returncode}",
                                   hint="check that `ssh TARGET` works on its own")
                if time.monotonic() > deadline:
                    raise SshError(f"no forward from {target} after {WAIT:.0f} s")
                time.sleep(0.1)
            yield local
        finally:
            process.terminate()
            process.wait(10)
