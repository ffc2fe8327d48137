"""`adpop origin`: the central origin's API server, campaign store, publishing and rollouts."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli.common import Commands, Handler, existing, utc
from appliance.errors import AdpopError

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


def _call(args: argparse.Namespace, name: str, params: dict[str, str] | None = None,
          body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs operator action `name`: through the API with --origin URL (or $ADPOP_ORIGIN),
    else on this host's database (the bootstrap; recorded as local:USER)."""
    import getpass
    import os

    from appliance.origin import ops

    op = ops.BY_NAME[name]
    url = getattr(args, "origin", None) or os.environ.get("ADPOP_ORIGIN", "")
    if url:
        from appliance.origin.client import OriginClient

        return OriginClient(url, _token(args)).call(op, params or {}, body or {})
    from appliance.origin.ca import Authority

    origin, db = _origin(args, create=op.writes)
    authority = Authority.open(Path(origin.origin.state_dir) / "ca")
    try:
        return ops.run(op, ops.Context(db, origin, authority), f"local:{getpass.getuser()}",
                       params or {}, body or {})
    finally:
        db.close()


def _token(args: argparse.Namespace) -> str:
    import os

    from appliance import secrets

    if args.token_file:
        return secrets.read(Path(args.token_file), "--token-file")
    token = os.environ.get("ADPOP_TOKEN", "")
    if not token:
        raise AdpopError("--origin needs an operator token",
                         hint="give --token-file FILE (mode 0600) or set ADPOP_TOKEN; an admin "
                              "makes one with `adpop origin tokens create NAME --role ROLE`")
    return token


def cmd_origin_serve(args: argparse.Namespace) -> int:
    from appliance.origin import server
    from appliance.origin.ca import Authority

    origin, db = _origin(args)
    authority = Authority.open(Path(origin.origin.state_dir) / "ca")
    removed = db.clean_leftovers()
    if removed:
        log.warning("removed %d payload files left by interrupted publishes: %s",
                    len(removed), ", ".join(path.name for path in removed))
    from appliance.origin.publish import reconcile, repository

    with db.exclusive():
        listed = reconcile(db, repository(origin))
    if listed:
        log.warning("listed versions %s in the TUF targets: a publish stopped before it did",
                    ", ".join(map(str, listed)))
    server.serve(db, origin, args.listen or origin.origin.listen, authority,
                 server.server_context(origin.origin, authority))
    return 0


def cmd_origin_import(args: argparse.Namespace) -> int:
    from appliance.origin.db import folder_documents

    # Read here, sent whole: the origin validates them with what it stores.
    documents = dict(folder_documents(Path(args.folder)))
    done = _call(args, "campaigns.import", body={"documents": documents})
    print(f"imported {args.folder}: the store now holds {done['campaigns']} campaigns")
    return 0


def cmd_origin_list(args: argparse.Namespace) -> int:
    rows = _call(args, "campaigns.list")["campaigns"]
    if not rows:
        print("no campaigns; import some with `adpop origin campaigns import DIR`")
        return 0
    print(f"{'campaign':24} {'advertiser':16} {'state':7} document")
    for row in rows:
        print(f"{row['id']:24} {row['advertiser']:16} "
              f"{'paused' if row['paused'] else 'live':7} {row['document']}")
    return 0


def cmd_origin_pause(args: argparse.Namespace) -> int:
    _call(args, f"campaigns.{args.action}", {"id": args.id})
    print(f"{args.id} {'paused' if args.action == 'pause' else 'resumed'}; "
          f"`adpop origin publish` sends the change to the fleet")
    return 0


def cmd_origin_publish(args: argparse.Namespace) -> int:
    done = _call(args, "publish", body={"allow_jump": args.allow_jump})
    print(f"published v{done['version']}: {done['campaigns']} campaigns, {done['length']} "
          f"bytes, sha256 {done['sha256'][:16]}…, rollout stage {done['stage']} "
          f"({done['seconds']:.2f}s)")
    return 0


def cmd_origin_rollout(args: argparse.Namespace) -> int:
    if args.action != "status":
        done = _call(args, f"rollout.{args.action}", {"version": str(args.version)})
        print(f"v{done['version']}: stage {done['stage']}"
              + (f" ({done['halted']})" if done["halted"] else ""))
        return 0
    info = _call(args, "rollout.status")
    print(f"{'version':>7}  {'campaigns':>9}  {'stage':8} {'on':>5}  halted")
    for v in info["versions"]:
        print(f"{v['version']:>7}  {v['campaigns']:>9}  {v['stage']:8} "
              f"{v['on']:>2}/{info['pops']:<2}  {v['halted'] or '-'}")
    return 0


def cmd_origin_fleet(args: argparse.Namespace) -> int:
    info = _call(args, "fleet")
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


def cmd_origin_keys(args: argparse.Namespace) -> int:
    from appliance.origin.publish import repository
    from appliance.origin.tuf_repo import Repository

    origin, db = _origin(args)
    with db.exclusive():
        repo = repository(origin)
        if args.action == "init":
            print(f"TUF repository {repo.folder}: root v{repo.root().version}, keys in "
                  f"{repo.keys} (move all but the origin's share of the root keys offline)\n"
                  f"root.json   {repo.metadata / 'root.json'}  <- what every PoP trusts "
                  "first: `adpop pop trust FILE`, or `adpop flash --config` with "
                  "snapshot.trust_root")
        elif args.action == "rotate":
            print(repo.rotate(args.role))
        else:
            print(Repository(repo.folder).sign_root(Path(args.key)))
    return 0


def _secret_out(args: argparse.Namespace, secret: str) -> None:
    """A token into a 0600 file (never on a terminal), or alone on stdout so that
    `TOKEN=$(adpop origin … )` takes it."""
    if args.out:
        from appliance import secrets

        secrets.write(Path(args.out), secret + "\n")
    else:
        print(secret)


def cmd_origin_pops_enroll(args: argparse.Namespace) -> int:
    from appliance import config as cfg

    done = _call(args, "pops.enroll", {"name": args.name},
                 {"group": args.group, "ttl": args.ttl or ""})
    _secret_out(args, done["token"])
    log.info("enrollment token for %s (group %s), valid %s, usable once", done["pop"],
             done["group"], cfg.format_duration(int(done["ttl"])))
    return 0


def cmd_origin_pops_revoke(args: argparse.Namespace) -> int:
    print(_call(args, "pops.revoke", {"name": args.name})["result"])
    return 0


def cmd_origin_pops_list(args: argparse.Namespace) -> int:
    rows = _call(args, "pops.list")["pops"]
    if not rows:
        print("no PoP enrolled; `adpop origin pops enroll NAME` makes a token for one")
    for row in rows:
        certs, tokens = row["certificates"], row["tokens"]
        state = "enrolled" if certs else "waiting" if tokens else "revoked"
        print(f"{row['pop']:24} {row['group']:16} {state:9} {certs} certificate(s), "
              f"{tokens} token(s)")
    return 0


def cmd_origin_tokens(args: argparse.Namespace) -> int:
    if args.action == "create":
        done = _call(args, "tokens.create", {"name": args.name}, {"role": args.role})
        _secret_out(args, done["token"])
        log.info("operator token for %s (role %s); only its digest is kept", done["operator"],
                 done["role"])
    elif args.action == "revoke":
        _call(args, "tokens.revoke", {"name": args.name})
        print(f"operator {args.name}: token revoked")
    else:
        rows = _call(args, "tokens.list")["operators"]
        for row in rows:
            state = f"revoked {utc(int(row['revoked']))}" if row["revoked"] else "live"
            print(f"{row['name']:24} {row['role']:8} made {utc(int(row['created']))}  {state}")
        if not rows:
            print("no operator tokens; `adpop origin tokens create NAME --role admin`")
    return 0


def cmd_origin_audit(args: argparse.Namespace) -> int:
    for row in _call(args, "audit")["actions"]:
        print(f"{utc(int(row['at']))}  {row['operator']:20} {row['action']:18} "
              f"{row['target'] or '-':16} {row['outcome']}")
    return 0


def cmd_origin_report(args: argparse.Namespace) -> int:
    from appliance.origin.reports import COLUMNS

    done = _call(args, "report", body={"by": args.by, "since": args.since or "",
                                       "until": args.until or ""})
    rows = done["rows"]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if args.by == "budget":
        return _print_budgets(rows, args.format)
    if args.format == "csv":
        import csv
        import sys

        writer = csv.writer(sys.stdout)
        writer.writerow((args.by, *COLUMNS[1:]))
        writer.writerows([["" if row[c] is None else row[c] for c in COLUMNS] for row in rows])
        return 0
    if not rows:
        print("no events in that window")
        return 0

    def cell(value: Any, column: str) -> str:
        if value is None:
            return "-"
        if column in ("ctr", "fill_rate"):
            return f"{value:.2%}"
        return f"{value:,.2f}" if column == "spend" else f"{value:,}"

    widths = [max(len(args.by), *(len(str(r["key"])) for r in rows))] + [11] * 8
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w)
                    in enumerate(zip((args.by, *COLUMNS[1:]), widths, strict=True))))
    for row in rows:
        print("  ".join(str(row["key"]).ljust(widths[0]) if i == 0
                        else cell(row[c], c).rjust(widths[i])
                        for i, c in enumerate(COLUMNS)))
    return 0


BUDGET_COLUMNS = ("key", "pacing", "budget_daily", "budget_total", "today_cap", "spent_today",
                  "allowed", "pops", "eligible_per_s", "throttled")


def _print_budgets(rows: list[dict[str, Any]], form: str) -> int:
    """The budget view: money in currency units; allowed and demand come from the running
    origin's last pacing round ("-" when this report did not ask it)."""
    if form == "csv":
        import csv
        import sys

        writer = csv.writer(sys.stdout)
        writer.writerow(("campaign", *BUDGET_COLUMNS[1:]))
        writer.writerows([["" if row[c] is None else row[c] for c in BUDGET_COLUMNS]
                          for row in rows])
        return 0
    if not rows:
        print("no budgeted campaign is in flight")
        return 0

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    table = [("campaign", *BUDGET_COLUMNS[1:])] + [
        tuple(cell(row[c]) for c in BUDGET_COLUMNS) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(BUDGET_COLUMNS))]
    for r in table:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return 0


def cmd_origin_export(args: argparse.Namespace) -> int:
    import base64

    from appliance.durable import write_file

    done = _call(args, "events.export", body={"since": args.since or "",
                                              "until": args.until or ""})
    data = base64.b64decode(done["data"])
    write_file(Path(args.out), data)
    print(f"wrote {len(data):,} bytes of Parquet to {args.out}")
    return 0


def cmd_origin_ingest(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from appliance.events.nats import ingest
    from appliance.origin.events import open_store

    origin, db = _origin(args, create=False)
    db.close()
    events = origin.events
    store = open_store(origin.origin.state_dir)

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        log.info("ingesting from %s with %d workers", events.nats_url, args.workers or
                 events.ingest_workers)
        await ingest(store, events.nats_url, args.workers or events.ingest_workers,
                     events.nats_replicas, stop)

    try:
        asyncio.run(main())
    finally:
        store.close()
    return 0


def register(commands: Commands) -> None:
    origin = commands.add_parser("origin", help="the central origin").add_subparsers(
        dest="action", required=True, metavar="ACTION")

    def origin_parser(name: str, help_text: str, func: Handler, sub: Commands = origin,
                      remote: bool = True) -> argparse.ArgumentParser:
        """`remote`: an operator's action, run from anywhere through the origin's API."""
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="origin configuration file")
        p.add_argument("--state", help="state folder (overrides origin.state_dir)")
        p.set_defaults(func=func, origin=None, token_file=None)
        if remote:
            p.add_argument("--origin", metavar="URL",
                           help="the origin's API (default: $ADPOP_ORIGIN; none: this "
                                "host's database, for bootstrap)")
            p.add_argument("--token-file", metavar="FILE",
                           help="the operator token, mode 0600 (default: $ADPOP_TOKEN)")
        return p

    def group(name: str, help_text: str) -> Commands:
        return origin.add_parser(name, help=help_text).add_subparsers(
            dest="action", required=True, metavar="ACTION")

    def out(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", metavar="FILE", help="write the token to FILE (mode 0600) "
                       "instead of printing it")

    p = origin_parser("serve", "run the origin's HTTP API, rollouts and push notices",
                      cmd_origin_serve, remote=False)
    p.add_argument("--listen", help="HOST:PORT (overrides origin.listen)")
    camps = group("campaigns", "the campaign store")
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
    roll = group("rollout", "rollouts")
    origin_parser("status", "where each version's rollout stands", cmd_origin_rollout, roll)
    for verb, what in (("halt", "stop version V going to more PoPs"),
                       ("resume", "start version V's rollout again from its first stage"),
                       ("release", "send version V to every PoP now")):
        p = origin_parser(verb, what, cmd_origin_rollout, roll)
        p.add_argument("version", type=int)
    p = origin_parser("fleet", "registered PoPs and what they serve", cmd_origin_fleet)
    p.add_argument("--json", action="store_true")
    keys_ = group("keys", "the TUF repository's keys: what the fleet trusts")
    origin_parser("init", "make the TUF repository and its keys, if there are none",
                  cmd_origin_keys, keys_, remote=False)
    p = origin_parser("rotate", "new keys for ROLE in the next root (the old ones revoked)",
                      cmd_origin_keys, keys_, remote=False)
    p.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    root_ = group("root", "the TUF root")
    p = origin_parser("sign", "sign the staged root with a root key kept offline",
                      cmd_origin_keys, root_, remote=False)
    p.add_argument("--key", required=True, metavar="FILE", help="a root key (.key, 0600)")
    pops = group("pops", "PoP identities: enrollment and revocation")
    p = origin_parser("enroll", "print a one-time token that enrolls PoP NAME",
                      cmd_origin_pops_enroll, pops)
    p.add_argument("name", help="the PoP's id (its certificate's name)")
    p.add_argument("--group", default="default", help="its target group (default: default)")
    p.add_argument("--ttl", help="how long the token is valid, e.g. 1h (default: 1d)")
    out(p)
    p = origin_parser("revoke", "refuse PoP NAME's certificates from now on",
                      cmd_origin_pops_revoke, pops)
    p.add_argument("name")
    origin_parser("list", "enrolled PoPs, and those with a token waiting", cmd_origin_pops_list,
                  pops)
    tokens = group("tokens", "operator tokens and their roles")
    p = origin_parser("create", "print a new token for operator NAME", cmd_origin_tokens,
                      tokens)
    p.add_argument("name")
    p.add_argument("--role", choices=("read", "publish", "admin"), default="read",
                   help="read: look; publish: campaigns, publish, rollouts; admin: also "
                        "PoPs and tokens (default: read)")
    out(p)
    p = origin_parser("revoke", "refuse operator NAME's token from now on", cmd_origin_tokens,
                      tokens)
    p.add_argument("name")
    origin_parser("list", "operator tokens (names and roles; never the tokens)",
                  cmd_origin_tokens, tokens)
    origin_parser("audit", "every write: who, what, and how it ended", cmd_origin_audit)
    p = origin_parser("report", "requests, fill, impressions, clicks and spend from the "
                      "PoPs' events", cmd_origin_report)
    p.add_argument("--by", default="campaign",
                   choices=("campaign", "advertiser", "pop", "placement", "hour", "day",
                            "budget"),
                   help="budget: each budgeted campaign's budgets, today's spend, and what "
                        "the running origin allowed the PoPs")
    p.add_argument("--since", help="a time (2026-12-01T10:00Z) or how long ago (24h)")
    p.add_argument("--until", help="the same, for the end (default: now)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    events_ = group("events", "the event store")
    p = origin_parser("export", "write the events as Parquet (for ClickHouse, Spark, "
                      "DuckDB)", cmd_origin_export, events_)
    p.add_argument("--since", help="a time or how long ago (default: all)")
    p.add_argument("--until", help="the same, for the end (default: now)")
    p.add_argument("--format", choices=("parquet",), default="parquet")
    p.add_argument("--out", required=True, metavar="FILE")
    p = origin_parser("ingest", "store batches from the NATS JetStream stream "
                      "(events.transport = \"nats\") while no `serve` holds the store",
                      cmd_origin_ingest, remote=False)
    p.add_argument("--workers", type=int, help="pull consumers (default: "
                   "events.ingest_workers)")
