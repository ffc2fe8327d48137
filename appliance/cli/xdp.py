"""`adpop xdp`: the XDP packet filter (attach, detach, block, status)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli.common import Commands, appliance_config, appliance_flags

if TYPE_CHECKING:  # for annotations only: each command imports what it runs, so --help is fast
    from appliance import config as cfg
    from appliance.xdp import Filter


def _xdp(args: argparse.Namespace) -> tuple[cfg.ApplianceConfig, Filter]:
    from appliance import config as cfg
    from appliance.xdp import Filter

    appliance = appliance_config(args)
    if getattr(args, "pin_dir", None):
        appliance = cfg.replace_value(appliance, "xdp", "pin_dir", args.pin_dir)
    return appliance, Filter(appliance.xdp, appliance.tuning.local_port_range)


def _xdp_nics(args: argparse.Namespace, appliance: cfg.ApplianceConfig) -> list[str]:
    if args.nic:
        return list(args.nic)
    if appliance.xdp.nics:
        return list(appliance.xdp.nics)
    from appliance.tuning.host import Host

    return Host().serving_nics(list(appliance.tuning.nics))


def cmd_xdp_attach(args: argparse.Namespace) -> int:
    appliance, flt = _xdp(args)
    attached = flt.attach(_xdp_nics(args, appliance), args.netns or "")
    if flt.mounted:
        print(flt.mounted)
    for nic, mode in attached.items():
        print(f"{nic}: attached ({mode} mode)")
    return 0


def cmd_xdp_mount(args: argparse.Namespace) -> int:
    from appliance.xdp import libbpf

    _, flt = _xdp(args)
    print(libbpf.ensure_bpffs(flt.pin_dir) or f"{flt.pin_dir} is on a BPF file system")
    return 0


def cmd_xdp_detach(args: argparse.Namespace) -> int:
    appliance, flt = _xdp(args)
    for nic in flt.detach(_xdp_nics(args, appliance), args.netns or ""):
        print(f"{nic}: detached (pinned maps kept for the next attach)")
    return 0


def cmd_xdp_block(args: argparse.Namespace) -> int:
    from appliance.xdp import parse_cidr

    nets = [parse_cidr(text) for text in args.cidr]  # all checked before any is written
    _, flt = _xdp(args)
    if args.action == "block":
        print(f"blocked {flt.block(nets)} CIDRs")
    else:
        print(f"unblocked {flt.unblock(nets)} of {len(nets)} CIDRs")
    return 0


def cmd_xdp_load_blocklist(args: argparse.Namespace) -> int:
    from appliance.xdp import read_blocklist

    nets = read_blocklist(Path(args.file))
    _, flt = _xdp(args)
    started = time.monotonic()
    count = flt.block(nets)
    print(f"loaded {count} CIDRs from {args.file} in {time.monotonic() - started:.2f} s")
    return 0


def cmd_xdp_status(args: argparse.Namespace) -> int:
    _, flt = _xdp(args)
    status = flt.status()
    if args.action == "stats":
        status = {k: status.get(k) for k in ("counters", "top", "blocklist")}
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if "loaded" in status and not status["loaded"]:
        print(f"XDP filter {status['reason']}")
        return 1
    for nic, where in (status.get("attached") or {}).items():
        print(f"{nic}: attached, {where['mode']} mode"
              + (f" (netns {where['netns']})" if where.get("netns") else ""))
    blocked = status.get("blocklist") or {}
    print(f"blocklist: {blocked.get('ipv4', 0)} IPv4 + {blocked.get('ipv6', 0)} IPv6 CIDRs")
    for reason, counter in (status.get("counters") or {}).items():
        print(f"  {reason:10} {counter['packets']:>14} packets {counter['bytes']:>16} bytes")
    for row in status.get("top") or []:
        print(f"  top drop: {row['source']:40} {row['drops']:>10}")
    return 0


def register(commands: Commands) -> None:
    xdp = commands.add_parser("xdp", help="the XDP packet filter").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name, help_text, func in (
            ("status", "attachment, blocklist size, counters, top sources", cmd_xdp_status),
            ("stats", "counters by reason and top sources", cmd_xdp_status),
            ("attach", "load the filter (maps kept) and attach it, native else generic",
             cmd_xdp_attach),
            ("detach", "detach the filter; the pinned maps stay", cmd_xdp_detach),
            ("mount", "mount bpffs at /sys/fs/bpf when nothing has (attach does it too)",
             cmd_xdp_mount),
            ("block", "add CIDRs to the blocklist", cmd_xdp_block),
            ("unblock", "remove CIDRs from the blocklist", cmd_xdp_block),
            ("load-blocklist", "add every CIDR of a file (one per line)",
             cmd_xdp_load_blocklist)):
        p = xdp.add_parser(name, help=help_text)
        appliance_flags(p, state=False)
        p.add_argument("--pin-dir", help="bpffs folder of the pinned maps (xdp.pin_dir)")
        if name in ("status", "stats"):
            p.add_argument("--json", action="store_true")
        if name in ("attach", "detach"):
            p.add_argument("--nic", action="append", help="a NIC (repeat; default: xdp.nics)")
            p.add_argument("--netns", help="the network namespace of the NICs (ip netns name)")
        if name in ("block", "unblock"):
            p.add_argument("cidr", nargs="+")
        if name == "load-blocklist":
            p.add_argument("file")
        p.set_defaults(func=func)
