"""`adpop tune`: the host's kernel settings (plan, apply, verify, rollback, cmdline)."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from appliance.cli.common import Commands, appliance_config, appliance_flags, cell, print_rows
from appliance.errors import AdpopError

if TYPE_CHECKING:  # for annotations only: each command imports what it runs, so --help is fast
    from appliance import config as cfg
    from appliance.tuning.host import Host


def _needs_root(args: argparse.Namespace, what: str) -> None:
    """Writing the host's kernel settings needs root; say so in one line before trying."""
    if not args.root and os.geteuid() != 0:
        raise AdpopError(f"adpop tune {what} writes kernel settings under /proc and /sys and "
                         "needs root", hint=f"run it as root (sudo adpop tune {what}); "
                         "`adpop tune apply --dry-run` shows what it would write")


def _tune_setup(args: argparse.Namespace) -> tuple[cfg.ApplianceConfig, Host]:
    from appliance.tuning import plan

    return appliance_config(args), plan.load_host(args.root)


def cmd_tune_plan(args: argparse.Namespace) -> int:
    from appliance.tuning import plan

    appliance, host = _tune_setup(args)
    want, table = plan.report(appliance, host)
    if args.json:
        print(json.dumps({"knobs": table, "shard_cpus": list(want.layout.shard_cpus),
                          "housekeeping_cpus": sorted(want.layout.housekeeping)}, indent=2))
        return 0
    for row in table:
        row["current"] = cell(row["current"])
        row["change"] = {"ok": "", "absent": "(absent)"}.get(row["status"],
                                                             "→ " + cell(row["desired"]))
    print_rows(table, ("name", "current", "change", "why"))
    print(f"{len(plan.not_as_desired(table))} of {len(table)} knobs to change")
    return 0


def cmd_tune_apply(args: argparse.Namespace) -> int:
    from appliance.tuning import plan

    if not args.dry_run:
        _needs_root(args, "apply")
    appliance, host = _tune_setup(args)
    if args.wait_for_nics:
        print(f"waited for the NICs: {plan.wait_for_nics(host, args.wait_for_nics)}")
    outcomes = plan.apply(appliance, host, dry_run=args.dry_run)
    for o in outcomes:
        print(f"{o.name}: {o.path}: {o.result}")
    if args.dry_run:
        print(f"{len(outcomes)} writes; nothing written (dry run)")
        return 0
    bad = plan.not_as_desired(plan.report(appliance, host)[1])
    owned = sum(1 for o in outcomes if o.result == "kernel-owned")
    print(f"{len(outcomes)} written, {owned} kernel-owned, {len(bad)} not as desired"
          + "".join(f"\n  {r['name']}: {r['current']} (wanted {r['desired']})" for r in bad))
    return 1 if any(o.result.startswith("failed") for o in outcomes) or bad else 0


def cmd_tune_verify(args: argparse.Namespace) -> int:
    from appliance.tuning import plan

    appliance, host = _tune_setup(args)
    _, table = plan.report(appliance, host)
    bad = plan.not_as_desired(table)
    if args.json:
        print(json.dumps({"ok": not bad, "knobs": table}, indent=2))
    else:
        print_rows([{**r, "current": cell(r["current"]), "desired": cell(r["desired"])}
                     for r in table], ("name", "status", "current", "desired"))
        print("verified" if not bad else f"{len(bad)} knobs not as desired")
    return 0 if not bad else 1


def cmd_tune_rollback(args: argparse.Namespace) -> int:
    from appliance.tuning import plan

    _needs_root(args, "rollback")
    appliance, host = _tune_setup(args)
    outcomes = plan.rollback(appliance, host)
    for o in outcomes:
        print(f"{o.name}: {o.path}: {o.result}")
    failed = [o for o in outcomes if o.result not in ("restored", "kernel-owned")]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} restored"
          + ("" if not failed else "; the journal is kept for another try"))
    return 1 if failed else 0


def cmd_tune_cmdline(args: argparse.Namespace) -> int:
    from appliance.tuning import plan

    appliance, host = _tune_setup(args)
    print(plan.cmdline(appliance, host))
    return 0


def register(commands: Commands) -> None:
    tune = commands.add_parser("tune", help="host tuning").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name, help_text, func in (
            ("plan", "each knob's current and desired value", cmd_tune_plan),
            ("apply", "journal the originals, write what differs, verify", cmd_tune_apply),
            ("verify", "exit 0 when every knob is as desired, else 1", cmd_tune_verify),
            ("rollback", "write back the originals journaled at this boot's first apply",
             cmd_tune_rollback),
            ("cmdline", "the kernel command line the image should boot with",
             cmd_tune_cmdline)):
        p = tune.add_parser(name, help=help_text)
        appliance_flags(p)
        p.add_argument("--root", help="a fake sysfs/procfs tree standing for / (tests)")
        if name in ("plan", "verify"):
            p.add_argument("--json", action="store_true")
        if name == "apply":
            p.add_argument("--dry-run", action="store_true",
                           help="print what would be written where, write nothing")
            p.add_argument("--wait-for-nics", type=float, default=0, metavar="SECONDS",
                           help="first wait until udev has named the NICs (at boot), at "
                           "most SECONDS")
        p.set_defaults(func=func)
