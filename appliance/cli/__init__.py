"""`adpop` command line. Each command is a thin layer: parse, call the module, render.

One module per command group (appliance/cli/*.py), each with its handlers and, beside them,
the `register` that adds its parsers; `build_parser` only lists the groups in help order.
Handlers import what they run, so `adpop --help` imports no more than argparse needs.

Errors an operator can fix end in one line on stderr (`adpop: error: ... (hint: ...)`) and
exit 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from appliance.cli import control, operate, origin, parts, pop, settings, snapshot, tune, xdp
from appliance.cli.common import Handler
from appliance.errors import AdpopError

# In `adpop --help` order.
GROUPS = (settings, snapshot, origin, control, parts, tune, xdp, operate, pop)


class _Version(argparse.Action):
    """--version, read from the installed package's metadata only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"adpop {version('adpop')}")
        except PackageNotFoundError:
            print("adpop (not installed: run from a source tree without `pip install`)")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adpop", description="adpop edge PoP appliance")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the installed adpop version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`adpop status | head -1`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # as a shell reports a process ended by SIGPIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help and --version print, then exit here
        sys.stdout.flush()
        raise
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.func
    try:
        code = handler(args)
        sys.stdout.flush()  # here, where a closed pipe is handled, not at interpreter exit
        return code
    except AdpopError as exc:
        if args.debug:
            traceback.print_exc()
            for line in getattr(exc, "problems", [])[1:]:
                print(f"  {line.line() if hasattr(line, 'line') else line}", file=sys.stderr)
        print(f"adpop: error: {exc.line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
