"""The parts systemd runs: `adpop engine run`, `adpop cache run|secrets` and the unit
generator (`adpop units generate`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from appliance.cli.common import Commands, appliance_config, appliance_flags, store_of
from appliance.errors import AdpopError

log = logging.getLogger("adpop")


def _exec(argv: list[str]) -> int:
    """Replaces this process with `argv`, so systemd's main PID is the server itself."""

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        raise AdpopError(f"cannot run {argv[0]}: {exc.strerror}",
                         hint="check the binary path in the configuration") from exc
    return 1  # execv does not return


def cmd_engine_run(args: argparse.Namespace) -> int:
    from appliance.parts import engine_command

    appliance, store = store_of(args)
    if store.current_version() is None:
        raise AdpopError(f"no active snapshot under {appliance.paths.state_dir}",
                         hint="the supervisor starts the engine once the first one is verified")
    return _exec(engine_command(appliance))


def cmd_cache_run(args: argparse.Namespace) -> int:
    import shutil

    from appliance import cache
    from appliance.parts import state_path

    # No store: the cache's sandbox may not write the state directory.
    appliance = appliance_config(args)
    c = appliance.cache
    # Under systemd the unit's StateDirectory; otherwise the cache folder of the state dir.
    folder = Path(os.environ.get("STATE_DIRECTORY") or state_path(appliance, "cache"))
    folder.mkdir(parents=True, exist_ok=True)
    binary = args.binary or c.binary
    binary = shutil.which(binary) or binary
    # Under systemd the password files arrive as credentials; otherwise beside the password.
    secret_dir = (os.environ.get("CREDENTIALS_DIRECTORY")
                  or state_path(appliance, c.password_file).parent)
    if not os.environ.get("CREDENTIALS_DIRECTORY"):
        cache.write_secrets(state_path(appliance, c.password_file))
    return _exec(cache.server_argv(args.server, binary, c, folder,
                                   len(os.sched_getaffinity(0)), secret_dir))


def cmd_cache_secrets(args: argparse.Namespace) -> int:
    from appliance import cache
    from appliance.parts import state_path

    password_file = state_path(appliance_config(args), appliance_config(args).cache.password_file)
    cache.write_secrets(password_file)
    print(f"cache password in {password_file} and beside it (mode 0600)")
    return 0


def cmd_units_generate(args: argparse.Namespace) -> int:
    from appliance import cpulist, units

    try:
        appliance = appliance_config(args)
        written = units.write(Path(args.normal_dir), units.drop_ins(appliance, cpulist.online()))
    except (AdpopError, OSError) as exc:
        # A generator that fails must not stop the boot: the units keep their defaults.
        message = exc.line() if isinstance(exc, AdpopError) else str(exc)
        print(f"adpop-generator: no drop-ins written: {message}", file=sys.stderr)
        return 0
    for path in written:
        log.debug("wrote %s", path)
    return 0


def register(commands: Commands) -> None:
    engine = commands.add_parser("engine", help="the serving engine").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = engine.add_parser("run", help="exec the engine as the configuration says "
                          "(adpop-engine.service's ExecStart)")
    appliance_flags(p)
    p.set_defaults(func=cmd_engine_run)
    cache_cmd = commands.add_parser("cache", help="the local cache").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = cache_cmd.add_parser("run", help="exec the cache server as the configuration says "
                             "(the cache unit's ExecStart)")
    p.add_argument("--server", choices=("redis", "dragonfly"), default="redis")
    p.add_argument("--binary", help="the server binary (default: cache.binary)")
    appliance_flags(p)
    p.set_defaults(func=cmd_cache_run)
    p = cache_cmd.add_parser("secrets", help="make the cache password and the servers' files "
                             "naming it, 0600, when missing (adpop-secrets.service)")
    appliance_flags(p)
    p.set_defaults(func=cmd_cache_secrets)
    units_cmd = commands.add_parser("units", help="systemd integration").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = units_cmd.add_parser("generate", help="write the configuration's unit drop-ins "
                             "(the systemd generator)")
    p.add_argument("normal_dir", help="the generator's normal directory")
    p.add_argument("early_dir", nargs="?", help="unused (systemd passes it)")
    p.add_argument("late_dir", nargs="?", help="unused (systemd passes it)")
    appliance_flags(p, state=False)
    p.set_defaults(func=cmd_units_generate)
