"""How the parts are started from the configuration: paths under the state directory and
the engine's command line. Light on purpose: the generator (at boot) and `adpop engine run`
import it on the way, which is on the boot's critical path (seconds under TCG)."""

from __future__ import annotations

import os
from pathlib import Path

from appliance import config as cfg
from appliance.snapshot import CURRENT_LINK

# Where adpop-engine.service (RuntimeDirectory=adpop-engine) puts its admin socket.
APPLIANCE_ENGINE_SOCKET = "/run/adpop-engine/admin.sock"


def state_path(appliance: cfg.ApplianceConfig, path: str) -> Path:
    return cfg.under(appliance.paths.state_dir, path)


def engine_socket(appliance: cfg.ApplianceConfig) -> Path:
    """The engine's admin socket: as configured, else the engine unit's runtime directory
    (appliance) or `engine.sock` in the state directory (dev)."""
    default = "engine.sock" if appliance.supervisor.mode == "dev" else APPLIANCE_ENGINE_SOCKET
    return state_path(appliance, appliance.engine.admin_socket or default)


CACHE_PASSWORD_CREDENTIAL = "cache.password"  # the engine unit's LoadCredential= name


def engine_argv(appliance: cfg.ApplianceConfig, secret_dir: str | None = None) -> list[str]:
    """The engine's command line from the configuration alone, touching no file: what the
    generator writes into adpop-engine.service and what the dev-mode child runs. The engine
    makes a missing token key (32 random bytes, mode 0600) and spool folder itself. The cache
    password is read from `secret_dir` when given (the unit's credentials), else from
    cache.password_file."""
    password = (f"{secret_dir}/{CACHE_PASSWORD_CREDENTIAL}" if secret_dir is not None
                else str(state_path(appliance, appliance.cache.password_file)))
    e = appliance.engine
    listen = ",".join(part.strip() for part in e.listen.split(","))  # the engine's list form
    argv = [e.binary, "--listen", listen, "--admin", str(engine_socket(appliance)),
            "--snapshot", str(state_path(appliance, CURRENT_LINK)), "--shards", str(e.shards),
            "--spool", str(state_path(appliance, e.spool)),
            "--token-key", str(state_path(appliance, e.token_key)),
            "--idle-poll-us", str(e.idle_poll_us),
            "--spool-max-bytes", str(appliance.events.spool_max_bytes),
            # Spend, reservations and the dedup window outlive an engine there (CACHE.md).
            "--cache", appliance.cache.address, "--cache-password-file", password]
    if e.metrics_listen:
        argv += ["--metrics-listen", e.metrics_listen]
    # The tuning reserves huge pages for the shards: the snapshot goes on them when the host
    # has them free, else the engine maps the file as usual (its status says which).
    if appliance.tuning.hugepages_per_shard:
        argv.append("--hugepages")
    return argv + (["--cpus", e.cpus] if e.cpus else [])


def engine_command(appliance: cfg.ApplianceConfig) -> list[str]:
    """engine_argv, with the folders the engine's key and spool go in made first: the
    dev-mode child and `adpop engine run` have no StateDirectory= to make them."""
    e = appliance.engine
    for path in (e.token_key, e.spool):
        state_path(appliance, path).parent.mkdir(parents=True, exist_ok=True)
    # Under systemd (the unit's fallback ExecStart) the password arrives as a credential;
    # otherwise it is the cache's own file, made here when no cache has run yet.
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials is None:
        from appliance import secrets

        secrets.ensure(state_path(appliance, appliance.cache.password_file))
    return engine_argv(appliance, credentials)


def control_socket(appliance: cfg.ApplianceConfig) -> Path:
    return state_path(appliance, appliance.supervisor.control_socket)
