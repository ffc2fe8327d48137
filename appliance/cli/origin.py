"""`adpop origin`: the central origin's API server, campaign store, publishing and rollouts."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli.common import Commands, Handler, existing, utc

if TYPE_CHECKING:  # for annotations only: each command imports what it runs, so --help is fast
    from appliance import config as cfg
    from appliance.origin.db import OriginDB

log = logging.getLogger("adpop")


def _origin(args: argparse.Namespace, create: bool = True
            ) -> tuple[cfg.OriginConfig, OriginDB]:
    from appliance import config as cfg
    from appliance.origin.db import OriginDB

    origin = cfg.with_state(
        cfg.load(cfg.Scope.ORIGIN, Path(args.config) if args.config else None), args.state)
    if not create:
        existing(Path(origin.origin.state_dir), "origin state", "origin.state_dir")
    return origin, OriginDB(Path(origin.origin.state_dir))


def cmd_origin_serve(args: argparse.Namespace) -> int:
    from appliance.origin import rollout, server
    from appliance.origin.ca import Authority

    origin, db = _origin(args)
    authority = Authority.open(Path(origin.origin.state_dir) / "ca")
    removed = db.clean_leftovers()
    if removed:
        log.warning("removed %d payload files left by interrupted publishes: %s",
                    len(removed), ", ".join(path.name for path in removed))
    server.serve(db, rollout.plan_from_config(origin), args.listen or origin.origin.listen,
                 origin.origin.push_parallelism, authority,
                 server.server_context(origin.origin, authority))
    return 0


def cmd_origin_import(args: argparse.Namespace) -> int:
    _, db = _origin(args)
    campaign_set = db.import_dir(Path(args.folder))
    print(f"imported {args.folder}: the store now holds {len(campaign_set.campaigns)} campaigns")
    return 0


def cmd_origin_list(args: argparse.Namespace) -> int:
    _, db = _origin(args, create=False)
    rows = db.campaigns()
    if not rows:
        print("no campaigns; import some with `adpop origin campaigns import DIR`")
        return 0
    print(f"{'campaign':24} {'advertiser':16} {'state':7} document")
    for row in rows:
        print(f"{row.id:24} {row.advertiser:16} {'paused' if row.paused else 'live':7} "
              f"{row.document}")
    return 0


def cmd_origin_pause(args: argparse.Namespace) -> int:
    _, db = _origin(args)
    db.set_paused(args.id, args.action == "pause")
    print(f"{args.id} {'paused' if args.action == 'pause' else 'resumed'}; "
          f"`adpop origin publish` sends the change to the fleet")
    return 0


def cmd_origin_publish(args: argparse.Namespace) -> int:
    from appliance.origin.publish import publish

    origin, db = _origin(args)
    started = time.monotonic()
    done = publish(db, origin, allow_jump=args.allow_jump)
    print(f"published v{done.version}: {done.campaigns} campaigns, {done.length} bytes, sha256 "
          f"{done.sha256[:16]}…, rollout stage {done.stage} "
          f"({time.monotonic() - started:.2f}s)")
    return 0


def cmd_origin_rollout(args: argparse.Namespace) -> int:
    _, db = _origin(args, create=False)
    pops = db.pops()
    print(f"{'version':>7}  {'campaigns':>9}  {'stage':8} {'on':>5}  halted")
    for v in db.versions():
        on = sum(1 for p in pops if p.version >= v.version)
        print(f"{v.version:>7}  {v.campaigns:>9}  {v.stage:8} {on:>2}/{len(pops):<2}  "
              f"{v.halted or '-'}")
    return 0


def cmd_origin_fleet(args: argparse.Namespace) -> int:
    from appliance.origin.server import fleet

    _, db = _origin(args, create=False)
    info = fleet(db)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    now = time.time()
    print(f"{'pop':16} {'version':>7}  {'state':9} {'activated':20} {'seen':>6}  {'fails':>5}  "
          "last error")
    for p in info["pops"]:
        print(f"{p['id']:16} {p['version']:>7}  {p['state'] or '-':9} "
              f"{utc(int(p['activated'])) if p['activated'] else '-':20} "
              f"{now - p['last_seen']:>5.0f}s  {p['failures']:>5}  {p['last_error'] or '-'}")
    return 0


def cmd_origin_keys_init(args: argparse.Namespace) -> int:
    from appliance import config as cfg
    from appliance.snapshot.manifest import generate_key

    origin, _ = _origin(args)
    folder = cfg.under(origin.origin.state_dir, origin.snapshot.signing_keys[0])
    existing = sorted(folder.glob("*.key")) if folder.is_dir() else []
    if existing or folder.suffix == ".key":
        print(f"signing key already there: {existing[0] if existing else folder}")
        return 0
    key, pub = generate_key(folder)
    print(f"signing key {key} (mode 0600)\npublic key  {pub}  <- give this to every PoP: "
          "`adpop pop trust FILE`")
    return 0


def cmd_origin_pops_enroll(args: argparse.Namespace) -> int:
    from appliance import config as cfg
    from appliance.origin import enroll
    from appliance.origin.ca import Authority

    origin, db = _origin(args)
    ttl = cfg.parse_duration(args.ttl) if args.ttl else enroll.DEFAULT_TTL
    authority = Authority.open(Path(origin.origin.state_dir) / "ca")
    made = enroll.token(db, args.name, args.group, ttl, authority.fingerprint())
    if args.out:
        from appliance import secrets

        # Straight into a 0600 file (the PoP's sync.enrollment_token_file, or one for
        # `adpop flash --enrollment-token`): it never shows on a terminal.
        secrets.write(Path(args.out), made + "\n")
    else:
        # The token on stdout alone, so `TOKEN=$(adpop origin pops enroll ...)` takes it.
        print(made)
    log.info("enrollment token for %s (group %s), valid %s, usable once", args.name,
             args.group, cfg.format_duration(int(ttl)))
    return 0


def cmd_origin_pops_revoke(args: argparse.Namespace) -> int:
    from appliance.origin import enroll

    _, db = _origin(args, create=False)
    print(enroll.revoke(db, args.name))
    return 0


def cmd_origin_pops_list(args: argparse.Namespace) -> int:
    _, db = _origin(args, create=False)
    rows = db.identities()
    if not rows:
        print("no PoP enrolled; `adpop origin pops enroll NAME` makes a token for one")
    for pop, group, certs, tokens in rows:
        state = "enrolled" if certs else "waiting" if tokens else "revoked"
        print(f"{pop:24} {group:16} {state:9} {certs} certificate(s), {tokens} token(s)")
    return 0


def register(commands: Commands) -> None:
    origin = commands.add_parser("origin", help="the central origin").add_subparsers(
        dest="action", required=True, metavar="ACTION")

    def origin_parser(name: str, help_text: str, func: Handler,
                      sub: Commands = origin) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="origin configuration file")
        p.add_argument("--state", help="state folder (overrides origin.state_dir)")
        p.set_defaults(func=func)
        return p

    p = origin_parser("serve", "run the origin's HTTP API, rollouts and push notices",
                      cmd_origin_serve)
    p.add_argument("--listen", help="HOST:PORT (overrides origin.listen)")
    camps = origin.add_parser("campaigns", help="the campaign store").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = origin_parser("import", "validate a folder of campaign files and store it",
                      cmd_origin_import, camps)
    p.add_argument("folder")
    origin_parser("list", "list stored campaigns", cmd_origin_list, camps)
    for verb in ("pause", "resume"):
        p = origin_parser(verb, f"{verb} a campaign (takes effect at the next publish)",
                          cmd_origin_pause, camps)
        p.add_argument("id")
    p = origin_parser("publish", "compile and sign the next version and start its rollout",
                      cmd_origin_publish)
    p.add_argument("--allow-jump", action="store_true",
                   help="vouch for a big change in campaign count or size")
    roll = origin.add_parser("rollout", help="rollouts").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    origin_parser("status", "where each version's rollout stands", cmd_origin_rollout, roll)
    p = origin_parser("fleet", "registered PoPs and what they serve", cmd_origin_fleet)
    p.add_argument("--json", action="store_true")
    keys_ = origin.add_parser("keys", help="the origin's signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    origin_parser("init", "create a signing key where the configuration says, if none",
                  cmd_origin_keys_init, keys_)
    pops = origin.add_parser("pops", help="PoP identities: enrollment and revocation"
                             ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = origin_parser("enroll", "print a one-time token that enrolls PoP NAME",
                      cmd_origin_pops_enroll, pops)
    p.add_argument("name", help="the PoP's id (its certificate's name)")
    p.add_argument("--group", default="default", help="its target group (default: default)")
    p.add_argument("--ttl", help="how long the token is valid, e.g. 1h (default: 1d)")
    p.add_argument("--out", metavar="FILE", help="write the token to FILE (mode 0600) "
                   "instead of printing it")
    p = origin_parser("revoke", "refuse PoP NAME's certificates from now on",
                      cmd_origin_pops_revoke, pops)
    p.add_argument("name")
    origin_parser("list", "enrolled PoPs, and those with a token waiting", cmd_origin_pops_list,
                  pops)
