"""`adpop pop`: this PoP's snapshots and sync, without the supervisor."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli.common import Commands, Handler, appliance_flags, store_of
from appliance.cli.snapshot import cmd_snapshot_list


def cmd_pop_trust(args: argparse.Namespace) -> int:
    from appliance import config as cfg
    from appliance.sync.trust import check_root

    appliance, _ = store_of(args)
    data = Path(args.file).read_bytes() if Path(args.file).is_file() else b""
    version = check_root(data, args.file)  # refuses anything but a self-signed TUF root
    target = cfg.under(appliance.paths.state_dir, appliance.snapshot.trust_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    print(f"trusting the origin's TUF root v{version}: {target}")
    return 0


def cmd_pop_sync(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from appliance.sync.agent import SyncAgent

    appliance, store = store_of(args)
    agent = SyncAgent.from_config(appliance, store)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.once:
            from aiohttp import ClientSession

            async with ClientSession() as session:
                agent.session = session
                await agent.register("")
                await agent.attempt()
            return
        await agent.run(stop)

    asyncio.run(run())
    state = agent.state
    print(f"v{state.version or '-'} {state.state}" + (f"; {state.error}" if state.error else ""))
    return 0 if not state.error else 1


def cmd_pop_rollback(args: argparse.Namespace) -> int:
    import asyncio

    from appliance.sync.agent import roll_back
    from appliance.sync.engine import EngineAdmin

    appliance, store = store_of(args)
    socket_path = appliance.engine.admin_socket
    admin = EngineAdmin(socket_path) if socket_path else None
    print(asyncio.run(roll_back(store, admin, args.to)))
    return 0


def register(commands: Commands) -> None:
    pop = commands.add_parser("pop", help="this PoP's snapshots").add_subparsers(
        dest="action", required=True, metavar="ACTION")

    def pop_parser(name: str, help_text: str, func: Handler) -> argparse.ArgumentParser:
        p = pop.add_parser(name, help=help_text)
        appliance_flags(p)
        p.set_defaults(func=func)
        return p

    p = pop_parser("sync", "run the PoP side of sync (push listener and poll)", cmd_pop_sync)
    p.add_argument("--once", action="store_true", help="one sync, then exit (1 on a refusal)")
    pop_parser("snapshots", "retained snapshot versions", cmd_snapshot_list)
    p = pop_parser("trust", "trust the origin's TUF root.json (what `adpop origin keys init` "
                   "made)", cmd_pop_trust)
    p.add_argument("file")
    p = pop_parser("rollback", "activate a retained older version", cmd_pop_rollback)
    p.add_argument("--to", type=int, help="version (default: the one below the active)")
