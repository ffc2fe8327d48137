"""An operator's tools: `adpop console`, `adpop flash` and `adpop up`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.cli.common import Commands, appliance_flags, control_socket
from appliance.errors import AdpopError


def cmd_console(args: argparse.Namespace) -> int:
    import contextlib

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Textual without a terminal spins on its input: refuse before it starts.
        raise AdpopError("adpop console needs a terminal (stdin and stdout are not one)",
                         hint="run it in a terminal (ssh -t for a remote one), or use "
                              "`adpop status` for a one-shot view")
    from tui.app import ConsoleApp
    from tui.ssh import forward

    with contextlib.ExitStack() as stack:
        if args.ssh:
            from appliance.config import SupervisorSettings

            remote = args.remote_socket or SupervisorSettings.control_socket
            socket_path = stack.enter_context(forward(args.ssh, remote))
            title = f"{args.ssh}:{remote}"
        else:
            socket_path = control_socket(args)
            title = socket_path
        ConsoleApp(socket_path, read_only=args.read_only, refresh=args.refresh,
                   title=title).run()
    return 0


def cmd_flash(args: argparse.Namespace) -> int:
    from appliance import flash

    if not args.device:
        disks = flash.candidates()
        if args.json:
            print(json.dumps([d.__dict__ for d in disks], indent=2))
            return 0
        print("no device given; candidate disks:" if disks else "no candidate disks found")
        for d in disks:
            print(f"  {d.path:12} {d.size / 1e9:8.1f} GB  {d.model or '-':24} "
                  f"serial {d.serial or '-':16} {'removable' if d.removable else 'fixed':9} "
                  + (f"mounted: {', '.join(d.mounted)}" if d.mounted else "not mounted")
                  + (f"  REFUSED: {d.refused}" if d.refused else ""))
        print(f"then: adpop flash {args.image or 'IMAGE'} --device DEV [--config FILE]")
        return 0
    if not args.image:
        raise AdpopError("--device given without an image to write",
                         hint="adpop flash images/out/adpop-VERSION.raw --device DEV")
    result = flash.flash(Path(args.image), args.device,
                         Path(args.config) if args.config else None, yes=args.yes,
                         enrollment_token=Path(args.enrollment_token)
                         if args.enrollment_token else None)
    print(f"wrote {result['bytes']:,} bytes to {result['device']} in {result['seconds']} s, "
          f"verified sha256 {result['sha256'][:16]}"
          + (f"; site config {result['config']}"
             + (" with the origin's TUF root" if result["keys"] else "")
             if result["config"] else "")
          + (f"; enrollment token at {result['enrollment_token']} (used at first boot)"
             if result["enrollment_token"] else ""))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from appliance.up import up

    return up(Path(args.state), Path(args.campaigns) if args.campaigns else None, args.port,
              {"origin": args.origin_port, "push": args.push_port, "cache": args.cache_port})


def register(commands: Commands) -> None:
    p = commands.add_parser("console", help="the operator console (Textual)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the control socket (default: from the configuration)")
    where.add_argument("--ssh", metavar="USER@HOST", help="a remote PoP, through ssh")
    p.add_argument("--remote-socket",
                   help="the control socket on the remote PoP")
    p.add_argument("--read-only", action="store_true", help="hide every action that writes")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between reads")
    appliance_flags(p)
    p.set_defaults(func=cmd_console)
    p = commands.add_parser("flash", help="write the appliance image to a disk")
    p.add_argument("image", nargs="?",
                   help="the .raw image (images/out/adpop-VERSION.raw); none: list the disks")
    p.add_argument("--device", help="the whole disk to write (none: list the candidates)")
    p.add_argument("--config", help="the site's configuration drop-in (PoP id, origin, keys)")
    p.add_argument("--enrollment-token", metavar="FILE",
                   help="a token from `adpop origin pops enroll NAME --out FILE` (mode "
                        "0600): the PoP enrolls itself with it at first boot")
    p.add_argument("--yes", action="store_true", help="do not ask to type the device name")
    p.add_argument("--json", action="store_true", help="list candidates as JSON")
    p.set_defaults(func=cmd_flash)
    p = commands.add_parser("up", help="run an origin and a whole PoP on this machine")
    p.add_argument("--state", default=".adpop", help="state directory (default .adpop)")
    p.add_argument("--campaigns", help="campaign folder (default: the sample campaigns)")
    p.add_argument("--port", type=int, default=8080, help="the engine's port (default 8080)")
    for part, what in (("origin", "the origin's API"), ("push", "the PoP's push listener"),
                       ("cache", "the PoP's cache (redis-server)")):
        p.add_argument(f"--{part}-port", type=int, metavar="N",
                       help=f"{what} on 127.0.0.1:N (default: a free port)")
    p.set_defaults(func=cmd_up)
