"""What the command groups share: the handler type, the flags every appliance command has,
reading the configuration and the store they name, and plain-text tables."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from appliance.errors import AdpopError

if TYPE_CHECKING:
    from appliance import config as cfg
    from appliance.snapshot.store import SnapshotStore

Handler = Callable[[argparse.Namespace], int]
# What `add_subparsers()` returns: each group adds its commands to it. A string: the class is
# generic only to type checkers.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def utc(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def appliance_config(args: argparse.Namespace) -> cfg.ApplianceConfig:
    """The appliance configuration of --config (defaults without it), moved to --state."""
    from appliance import config as cfg

    return cfg.with_state(
        cfg.load(cfg.Scope.APPLIANCE, Path(args.config) if args.config else None),
        getattr(args, "state", None))


def existing(folder: Path, what: str, setting: str) -> None:
    """Read-only commands look at state, never make it: a missing folder (say /var/lib/...
    on an operator's laptop without --config) is one line, and nothing is created."""
    if not folder.is_dir():
        raise AdpopError(f"no {what} at {folder} ({setting}); nothing was created",
                         hint="give --config FILE (or --state DIR) of the one to read")


def store_of(args: argparse.Namespace, create: bool = True
             ) -> tuple[cfg.ApplianceConfig, SnapshotStore]:
    from appliance.snapshot.store import SnapshotStore

    appliance = appliance_config(args)
    if not create:
        existing(Path(appliance.paths.state_dir), "PoP state", "paths.state_dir")
    return appliance, SnapshotStore(Path(appliance.paths.state_dir),
                                    keep=appliance.snapshot.keep_versions)


def control_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    from appliance import parts

    appliance, _ = store_of(args)
    return str(parts.control_socket(appliance))


def appliance_flags(p: argparse.ArgumentParser, state: bool = True) -> None:
    """--config and --state, as every command that reads the appliance configuration has
    them (`appliance_config(args)` reads them back)."""
    p.add_argument("--config", help="appliance configuration file")
    if state:
        p.add_argument("--state", help="state directory (overrides paths.state_dir)")


def cell(value: str | None, width: int = 32) -> str:
    """A value on one table line: "-" for none, a file's first line, long ones cut."""
    if value is None:
        return "-"
    lines = value.splitlines() or [""]
    text = lines[0] + (" ..." if len(lines) > 1 else "")
    return text if len(text) <= width else text[:width - 3] + "..."


def print_rows(table: list[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(r[c])) for r in table)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in table:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
