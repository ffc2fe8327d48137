"""`adpop pop`: this PoP's snapshots and sync, without the supervisor."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli.common import Commands, Handler, appliance_flags, store_of
from appliance.cli.snapshot import cmd_snapshot_list


def cmd_pop_trust(args: argparse.Namespace) -> int:
    import shutil

    from appliance import config as cfg
    from appliance.snapshot.manifest import load_trust

    appliance, _ = store_of(args)
    source = Path(args.file)
    (kid,) = load_trust([source])  # refuses anything but one Ed25519 public key
    folder = cfg.under(appliance.paths.state_dir, appliance.snapshot.trust[0])
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / f"{kid}.pub")
    print(f"trusting key {kid}: {folder / f'{kid}.pub'}")
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
    p = pop_parser("trust", "trust a public key (an origin's .pub)", cmd_pop_trust)
    p.add_argument("file")
    p = pop_parser("rollback", "activate a retained older version", cmd_pop_rollback)
    p.add_argument("--to", type=int, help="version (default: the one below the active)")
