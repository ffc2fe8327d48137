"""`adpop config`: print and check configuration files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli.common import Commands

if TYPE_CHECKING:  # for annotations only: each command imports what it runs, so --help is fast
    from appliance import config as cfg


def _scope(args: argparse.Namespace, path: Path | None) -> cfg.Scope:
    from appliance import config as cfg

    if args.kind:
        return cfg.Scope(args.kind)
    return cfg.scope_of(path) if path else cfg.Scope.APPLIANCE


def cmd_config_dump(args: argparse.Namespace) -> int:
    from appliance import config as cfg

    path = Path(args.config) if args.config else None
    scope = _scope(args, path)
    sys.stdout.write(cfg.dump(cfg.load(scope, path), scope))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from appliance import config as cfg

    status = 0
    for name in args.files:
        path = Path(name)
        scope = _scope(args, path)
        if not path.is_file():
            print(f"{path}: -: no such file; fix: give the path of an existing TOML file")
            status = 2
            continue
        problems = cfg.check_files([path, *cfg.dropin_files(path)], scope)
        for problem in problems:
            print(problem.line())
        if problems:
            status = 2
    return status


# config.Scope's values, spelt out: importing the configuration module costs --help more
# than the rest of the command line (tests/test_cli.py holds the two together).
SCOPES = ("appliance", "origin")


def register(commands: Commands) -> None:
    config = commands.add_parser("config", help="show and check configuration").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = config.add_parser("dump", help="print the effective configuration as TOML")
    p.add_argument("--config", help="configuration file (drop-ins in NAME.d/ are applied)")
    p.add_argument("--kind", choices=SCOPES,
                   help="appliance or origin (default: from the file name)")
    p.set_defaults(func=cmd_config_dump)
    p = config.add_parser("check", help="check configuration files; exit 2 listing problems")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--kind", choices=SCOPES,
                   help="appliance or origin (default: from the file name)")
    p.set_defaults(func=cmd_config_check)
