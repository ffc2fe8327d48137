"""How the parts are started from the configuration: paths under the state directory and
the engine's command line. Light on purpose: `adpop engine run` and `adpop cache run` import
only this on the way to exec, which is on the boot's critical path (seconds under TCG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from appliance import config as cfg
from appliance.snapshot.store import SnapshotStore

# Where adpop-engine.service (RuntimeDirectory=adpop-engine) puts its admin socket.
APPLIANCE_ENGINE_SOCKET = "/run/adpop-engine/admin.sock"


def state_path(appliance: Any, path: str) -> Path:
    return cfg.under(appliance.paths.state_dir, path)


TUNE_UNIT = "adpop-tune.service"
XDP_UNIT = "adpop-xdp.service"
def engine_socket(appliance: Any) -> Path:
    """The engine's admin socket: as configured, else the engine unit's runtime directory
    (appliance) or `engine.sock` in the state directory (dev)."""
    default = "engine.sock" if appliance.supervisor.mode == "dev" else APPLIANCE_ENGINE_SOCKET
    return state_path(appliance, appliance.engine.admin_socket or default)


def engine_command(appliance: Any, store: SnapshotStore) -> list[str]:
    """The engine's command line from the configuration, for the dev-mode child and for
    `adpop engine run` in adpop-engine.service alike. Makes the token key (32 random bytes,
    mode 0600) and the spool folder when missing, and clears a socket a killed engine left."""
    e = appliance.engine
    key = state_path(appliance, e.token_key)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(32))
    spool = state_path(appliance, e.spool)
    spool.mkdir(parents=True, exist_ok=True)
    socket_path = engine_socket(appliance)
    socket_path.unlink(missing_ok=True)
    argv = [e.binary, "--listen", e.listen, "--admin", str(socket_path), "--snapshot",
            str(store.current_link), "--shards", str(e.shards), "--spool", str(spool),
            "--token-key", str(key), "--idle-poll-us", str(e.idle_poll_us)]
    return argv + (["--cpus", e.cpus] if e.cpus else [])


def control_socket(appliance: Any) -> Path:
    return state_path(appliance, appliance.supervisor.control_socket)
