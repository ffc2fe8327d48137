"""The supervisor and what talks to it over the control socket: `adpop supervisor`,
`status`, `sync-now`, `rollback`, `drain` and `undrain`."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from appliance.cli.common import Commands, appliance_flags, control_socket, store_of


def cmd_supervisor(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from appliance.tls import trust_directory_only

    trust_directory_only()  # before aiohttp builds its contexts: see appliance/tls.py
    from appliance.supervisor.control import ControlServer
    from appliance.supervisor.core import Supervisor
    from appliance.supervisor.notify import setup_logging

    appliance, store = store_of(args)
    context, recent = setup_logging(args.debug)
    supervisor = Supervisor(appliance, store, context, recent, keep_parts=args.keep_parts)

    async def run() -> None:
        from appliance.httpguard import quiet_floods

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        quiet_floods(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await supervisor.run(stop, ControlServer)

    asyncio.run(run())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.supervisor import client

    status = client.status(control_socket(args))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    snap = status["snapshot"]
    stale = client.stale_for(status, time.time())
    if stale:
        # The supervisor answered, but its health loop has not run for a while: the figures
        # below are old, and saying so matters more than they do.
        print(f"STALE: the supervisor's last health round was {stale:.0f} s ago (every "
              f"{status['health_interval']:g} s expected); the figures below are that old")
    print(f"{status['pop']}: {'ready' if status['ready'] else 'NOT ready'} - {status['summary']}")
    print(f"snapshot: v{snap['version'] or '-'} {snap['sha256'][:16]}")
    level, text = client.sync_line(status["sync"])
    print(f"  {'sync':8} {dict(ok='ok', warn='PIN', bad='FAIL')[level]:4} {text}")
    for name, comp in status["components"].items():
        print(f"  {name:8} {'ok' if comp['ok'] else 'FAIL':4} {comp.get('reason', '')}")
    events: dict[str, Any] = dict(status.get("events") or {})
    if events:
        ship = events.get("shipping") or {}
        last = ship.get("last_ack") or 0
        print(f"  {'events':8} {'ok' if events.get('ok', True) else 'WARN':4} "
              f"backlog {events.get('closed_segments', 0)} closed segments, "
              f"{events.get('backlog_bytes', 0):,} bytes"
              + (f"; shipping {ship.get('events_per_second', 0):,.0f}/s, oldest "
                 f"{ship.get('oldest_age_s', 0):.0f} s, last ack "
                 + (f"{time.time() - last:.0f} s ago" if last else "never")
                 + f", {ship.get('failures', 0)} failures" if ship else "")
              + (f"; {events['reason']}" if events.get("reason") else ""))
    pacing: dict[str, Any] = dict(status.get("pacing") or {})
    if pacing:
        level, text, rows = client.pacing_view(pacing, time.time())
        print(f"  {'budgets':8} {dict(ok='ok', warn='WAIT', bad='FAIL')[level]:4} {text}")
        for row in rows:
            print(f"           {row}")
    tuning = status.get("tuning", {})
    if not tuning.get("enabled"):
        print(f"  tuning   off  {tuning.get('reason', '')}")
    else:
        drifting = tuning["drifting"]
        print(f"  tuning   {'ok' if not drifting else 'DRIFT':4} "
              + (f"drifting: {', '.join(drifting)}; " if drifting else "")
              + f"{tuning['repairs']} repairs, irqbalance {tuning['irqbalance']}"
              + (f"; {tuning['error']}" if tuning["error"] else ""))
    return 0 if status["ready"] and not stale else 1


def _control_write(route: str, body: dict[str, Any] | None = None) -> Callable[..., int]:
    def command(args: argparse.Namespace) -> int:
        from appliance.supervisor import client

        print(client.write(control_socket(args), route, body)["message"])
        return 0
    return command


def cmd_rollback(args: argparse.Namespace) -> int:
    return _control_write("/v1/rollback", {"to": args.to} if args.to is not None else {})(args)


def register(commands: Commands) -> None:
    p = commands.add_parser("supervisor", help="run the supervisor (systemd's ExecStart)")
    appliance_flags(p)
    p.add_argument("--keep-parts", action="store_true",
                   help="dev mode: the engine and the cache outlive this supervisor and the next "
                   "one adopts them (`adpop up` restarts a supervisor that dies)")
    p.set_defaults(func=cmd_supervisor)
    for name, help_text, func in (
            ("status", "the PoP's status from its supervisor", cmd_status),
            ("sync-now", "ask the supervisor to sync with the origin now",
             _control_write("/v1/sync-now")),
            ("rollback", "activate a retained older snapshot (default: the previous one)",
             cmd_rollback),
            ("drain", "stop taking new connections; requests in flight finish",
             _control_write("/v1/drain")),
            ("undrain", "take new connections again", _control_write("/v1/undrain"))):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--socket", help="the control socket (default: from the configuration)")
        appliance_flags(p)
        if name == "status":
            p.add_argument("--json", action="store_true", help="the whole status as JSON")
        if name == "rollback":
            p.add_argument("--to", type=int, help="the version to activate")
        p.set_defaults(func=func)
