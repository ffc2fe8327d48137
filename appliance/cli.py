"""`adpop` command line. Each command is a thin layer: parse, call the module, render.

Errors an operator can fix end in one line on stderr (`adpop: error: ... (hint: ...)`) and
exit 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance import config as cfg
from appliance.errors import AdpopError

log = logging.getLogger("adpop")

Handler = Callable[[argparse.Namespace], int]


def _scope(args: argparse.Namespace, path: Path | None) -> cfg.Scope:
    if args.kind:
        return cfg.Scope(args.kind)
    return cfg.scope_of(path) if path else cfg.Scope.APPLIANCE


def cmd_config_dump(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config else None
    scope = _scope(args, path)
    sys.stdout.write(cfg.dump(cfg.load(scope, path), scope))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
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


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from appliance.snapshot.manifest import generate_key

    key, pub = generate_key(Path(args.out))
    print(f"private key {key} (mode 0600)\npublic key  {pub}")
    return 0


def cmd_snapshot_synth(args: argparse.Namespace) -> int:
    from appliance.snapshot import synth

    started = time.monotonic()
    paths = synth.write(synth.generate(args.campaigns, args.seed), Path(args.out))
    print(f"wrote {args.campaigns} synthetic campaigns (seed {args.seed}) in {len(paths)} files "
          f"to {args.out} ({time.monotonic() - started:.1f}s)")
    return 0


def _created(args: argparse.Namespace) -> int | None:
    """The build's creation time: --created, else SOURCE_DATE_EPOCH (reproducible builds),
    else None for now. Both the payload and the manifest carry it, so fixing it makes two
    builds of the same inputs byte-identical."""
    from appliance.snapshot.model import parse_time

    for text, where in ((args.created, "--created"),
                        (os.environ.get("SOURCE_DATE_EPOCH"), "SOURCE_DATE_EPOCH")):
        if text is None:
            continue
        value = int(text) if text.strip().isdigit() else parse_time(text.strip())
        if value is None or value < 0:
            raise AdpopError(f"{where} {text!r} is not a time",
                             hint="give Unix seconds or an ISO 8601 time, e.g. "
                                  "2026-12-01T00:00:00Z")
        return value
    return None


def cmd_snapshot_build(args: argparse.Namespace) -> int:
    from appliance.snapshot import bundle
    from appliance.snapshot.manifest import load_signing_keys
    from appliance.snapshot.model import load_campaigns

    origin = cfg.load(cfg.Scope.ORIGIN, Path(args.config) if args.config else None)
    keys = load_signing_keys([Path(k) for k in args.key] if args.key else
                             [cfg.under(origin.origin.state_dir, k)
                              for k in origin.snapshot.signing_keys])
    ttl = cfg.parse_duration(args.ttl) if args.ttl else origin.snapshot.ttl
    started = time.monotonic()
    campaigns = load_campaigns(Path(args.campaigns))
    loaded = time.monotonic()
    built = bundle.build(campaigns, args.version, keys, ttl=ttl,
                         target_group=args.group or origin.snapshot.target_group,
                         previous_sha256=args.previous or "", now=_created(args))
    compiled = time.monotonic()
    bundle.write(built, Path(args.out))
    st = built.stats
    print(f"snapshot v{args.version} -> {args.out}: {st.campaigns} campaigns "
          f"({st.paused_skipped} paused left out), {st.ads} ads, {st.conjunctions} conjunctions, "
          f"payload {len(built.payload)} bytes sha256 {built.manifest.payload_sha256[:16]}…, "
          f"signed by {', '.join(k.id for k in keys)}; load {loaded - started:.2f}s, "
          f"compile+sign {compiled - loaded:.2f}s")
    return 0


def _verify_policy(args: argparse.Namespace) -> Any:
    from appliance.snapshot import bundle

    if args.config:
        appliance = cfg.load(cfg.Scope.APPLIANCE, Path(args.config))
        pol = bundle.policy_from_config(appliance)
        if not args.trust:
            return pol
    if not args.trust:
        raise AdpopError("no trusted keys given", hint="pass --trust PUBFILE_OR_DIR or --config")
    return bundle.policy([Path(t) for t in args.trust], threshold=args.threshold,
                         target_group=args.group)


def cmd_snapshot_verify(args: argparse.Namespace) -> int:
    from appliance.snapshot.manifest import VerifyError, verify_dir

    policy = _verify_policy(args)
    started = time.monotonic()
    try:
        manifest, _ = verify_dir(Path(args.folder), policy)
    except VerifyError as exc:
        print(f"adpop: verify failed: {exc.line()}", file=sys.stderr)
        return 2
    print(f"ok: version {manifest.version} group {manifest.target_group} sha256 "
          f"{manifest.payload_sha256[:16]}… ({manifest.payload_length} bytes) verified in "
          f"{(time.monotonic() - started) * 1000:.1f} ms")
    return 0


def cmd_snapshot_inspect(args: argparse.Namespace) -> int:
    from appliance.snapshot import bundle
    from appliance.snapshot.manifest import MANIFEST_NAME, PAYLOAD_NAME, Manifest

    folder = Path(args.folder)
    try:
        doc = json.loads((folder / MANIFEST_NAME).read_bytes())
        manifest = Manifest.from_signed(doc["signed"])
        payload = (folder / PAYLOAD_NAME).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdpopError(f"{folder} is not a readable snapshot folder ({exc})",
                         hint="give a folder written by `adpop snapshot build`") from exc
    info = bundle.describe(manifest, payload)
    info["signatures"] = [s.get("keyid") for s in doc.get("signatures", [])]
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    m = info["manifest"]
    print(f"version        {m['version']}  (group {m['target_group']}, schema {m['schema_id']})")
    print(f"created        {_utc(m['created'])}   expires {_utc(m['expires'])}")
    print(f"payload        {info['payload_bytes']} bytes  sha256 {m['payload_sha256']}")
    print(f"previous       {m['previous_sha256'] or '-'}")
    print(f"signed by      {', '.join(info['signatures']) or '-'}")
    print("counts         " + "  ".join(f"{k} {v}" for k, v in info["counts"].items()))
    idx = info["index"]
    print(f"index          {idx['conjunctions']} conjunctions, {idx['posting_entries']} entries, "
          f"longest list {idx['longest_posting_list']}, Z list {idx['zero_entries']}")
    print("  by size K    " + "  ".join(
        f"K={k}: {n} conj/{idx['posting_lists_by_size'].get(k, 0)} lists"
        for k, n in idx["conjunctions_by_size"].items()))
    print("  values       " + "  ".join(f"{k} {v}" for k, v in idx["attribute_values"].items()))
    print("placements     " + "  ".join(
        f"{k} {v}" for k, v in info["placement_candidates"].items()) + "  (candidate campaigns)")
    return 0


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _appliance(args: argparse.Namespace) -> Any:
    """The appliance configuration of --config (defaults without it), moved to --state."""
    return cfg.with_state(
        cfg.load(cfg.Scope.APPLIANCE, Path(args.config) if args.config else None),
        getattr(args, "state", None))


def _existing(folder: Path, what: str, setting: str) -> None:
    """Read-only commands look at state, never make it: a missing folder (say /var/lib/...
    on an operator's laptop without --config) is one line, and nothing is created."""
    if not folder.is_dir():
        raise AdpopError(f"no {what} at {folder} ({setting}); nothing was created",
                         hint="give --config FILE (or --state DIR) of the one to read")


def _store(args: argparse.Namespace, create: bool = True) -> tuple[Any, Any]:
    from appliance.snapshot.store import SnapshotStore

    appliance = _appliance(args)
    if not create:
        _existing(Path(appliance.paths.state_dir), "PoP state", "paths.state_dir")
    return appliance, SnapshotStore(Path(appliance.paths.state_dir),
                                    keep=appliance.snapshot.keep_versions)


def cmd_snapshot_install(args: argparse.Namespace) -> int:
    from appliance.snapshot import bundle
    from appliance.snapshot.manifest import VerifyError, verify_dir

    appliance, store = _store(args)
    try:
        manifest, payload = verify_dir(Path(args.folder), bundle.policy_from_config(appliance))
    except VerifyError as exc:
        print(f"adpop: install refused: {exc.line()}", file=sys.stderr)
        return 2
    manifest_bytes = (Path(args.folder) / "manifest.json").read_bytes()
    path = store.install(manifest.version, manifest_bytes, payload)
    print(f"installed and activated version {manifest.version} at {path}")
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    _, store = _store(args, create=False)
    rows = store.listing()
    if not rows:
        print(f"no snapshots stored under {store.root}")
        return 0
    print(f"{'version':>8}  {'state':8}  path   (high-water {store.high_water()})")
    for row in rows:
        print(f"{row.version:>8}  {'active' if row.active else 'retained':8}  {row.path}")
    return 0


# --- origin --------------------------------------------------------------------------------

def _origin(args: argparse.Namespace, create: bool = True) -> tuple[Any, Any]:
    from appliance.origin.db import OriginDB

    origin = cfg.with_state(
        cfg.load(cfg.Scope.ORIGIN, Path(args.config) if args.config else None), args.state)
    if not create:
        _existing(Path(origin.origin.state_dir), "origin state", "origin.state_dir")
    return origin, OriginDB(Path(origin.origin.state_dir))


def cmd_origin_serve(args: argparse.Namespace) -> int:
    from appliance import secrets
    from appliance.origin import rollout, server

    origin, db = _origin(args)
    removed = db.clean_leftovers()
    if removed:
        log.warning("removed %d payload files left by interrupted publishes: %s",
                    len(removed), ", ".join(path.name for path in removed))
    token_file = origin.origin.push_token_file
    token = secrets.read(cfg.under(origin.origin.state_dir, token_file),
                         "origin.push_token_file") if token_file else ""
    server.serve(db, rollout.plan_from_config(origin), args.listen or origin.origin.listen,
                 token, origin.origin.push_parallelism)
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
              f"{_utc(int(p['activated'])) if p['activated'] else '-':20} "
              f"{now - p['last_seen']:>5.0f}s  {p['failures']:>5}  {p['last_error'] or '-'}")
    return 0


def cmd_origin_keys_init(args: argparse.Namespace) -> int:
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


# --- PoP -----------------------------------------------------------------------------------


def cmd_pop_trust(args: argparse.Namespace) -> int:
    import shutil

    from appliance.snapshot.manifest import load_trust

    appliance, _ = _store(args)
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

    appliance, store = _store(args)
    agent = SyncAgent(appliance, store)

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

    appliance, store = _store(args)
    socket_path = appliance.engine.admin_socket
    admin = EngineAdmin(socket_path) if socket_path else None
    print(asyncio.run(roll_back(store, admin, args.to)))
    return 0


def _control_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    from appliance.parts import control_socket

    appliance, _ = _store(args)
    return str(control_socket(appliance))


def cmd_supervisor(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from appliance.tls import trust_directory_only

    trust_directory_only()  # before aiohttp builds its contexts: see appliance/tls.py
    from appliance.supervisor.control import ControlServer
    from appliance.supervisor.core import Supervisor
    from appliance.supervisor.notify import setup_logging

    appliance, store = _store(args)
    context, recent = setup_logging(args.debug)
    supervisor = Supervisor(appliance, store, context, recent, keep_parts=args.keep_parts)

    async def run() -> None:
        from appliance.httpguard import quiet_floods

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        quiet_floods(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await supervisor.run(stop, ControlServer)

    asyncio.run(run())
    return 0


def _exec(argv: list[str]) -> int:
    """Replaces this process with `argv`, so systemd's main PID is the server itself."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        raise AdpopError(f"cannot run {argv[0]}: {exc.strerror}",
                         hint="check the binary path in the configuration") from exc
    return 1  # execv does not return


def cmd_engine_run(args: argparse.Namespace) -> int:
    from appliance.parts import engine_command

    appliance, store = _store(args)
    if store.current_version() is None:
        raise AdpopError(f"no active snapshot under {appliance.paths.state_dir}",
                         hint="the supervisor starts the engine once the first one is verified")
    return _exec(engine_command(appliance))


def cmd_cache_run(args: argparse.Namespace) -> int:
    import os
    import shutil

    from appliance import cache
    from appliance.parts import state_path

    # No store: the cache's sandbox may not write the state directory.
    appliance = _appliance(args)
    c = appliance.cache
    # Under systemd the unit's StateDirectory; otherwise the cache folder of the state dir.
    folder = Path(os.environ.get("STATE_DIRECTORY") or state_path(appliance, "cache"))
    folder.mkdir(parents=True, exist_ok=True)
    binary = args.binary or c.binary
    binary = shutil.which(binary) or binary
    # Under systemd the password files arrive as credentials; otherwise beside the password.
    secret_dir = (os.environ.get("CREDENTIALS_DIRECTORY")
                  or state_path(appliance, c.password_file).parent)
    if not os.environ.get("CREDENTIALS_DIRECTORY"):
        cache.write_secrets(state_path(appliance, c.password_file))
    return _exec(cache.server_argv(args.server, binary, c, folder,
                                   len(os.sched_getaffinity(0)), secret_dir))


def cmd_cache_secrets(args: argparse.Namespace) -> int:
    from appliance import cache
    from appliance.parts import state_path

    password_file = state_path(_appliance(args), _appliance(args).cache.password_file)
    cache.write_secrets(password_file)
    print(f"cache password in {password_file} and beside it (mode 0600)")
    return 0


def cmd_units_generate(args: argparse.Namespace) -> int:
    from appliance import cpulist, units

    try:
        appliance = _appliance(args)
        written = units.write(Path(args.normal_dir), units.drop_ins(appliance, cpulist.online()))
    except (AdpopError, OSError) as exc:
        # A generator that fails must not stop the boot: the units keep their defaults.
        message = exc.line() if isinstance(exc, AdpopError) else str(exc)
        print(f"adpop-generator: no drop-ins written: {message}", file=sys.stderr)
        return 0
    for path in written:
        log.debug("wrote %s", path)
    return 0


def _tune_setup(args: argparse.Namespace) -> tuple[Any, Any]:
    from appliance.tuning import plan

    return _appliance(args), plan.load_host(args.root)


def _cell(value: str | None, width: int = 32) -> str:
    """A value on one table line: "-" for none, a file's first line, long ones cut."""
    if value is None:
        return "-"
    lines = value.splitlines() or [""]
    text = lines[0] + (" ..." if len(lines) > 1 else "")
    return text if len(text) <= width else text[:width - 3] + "..."


def _print_rows(table: list[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(r[c])) for r in table)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in table:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


def cmd_tune_plan(args: argparse.Namespace) -> int:
    from appliance.tuning import plan

    appliance, host = _tune_setup(args)
    want, table = plan.report(appliance, host)
    if args.json:
        print(json.dumps({"knobs": table, "shard_cpus": list(want.layout.shard_cpus),
                          "housekeeping_cpus": sorted(want.layout.housekeeping)}, indent=2))
        return 0
    for row in table:
        row["current"] = _cell(row["current"])
        row["change"] = {"ok": "", "absent": "(absent)"}.get(row["status"],
                                                             "→ " + _cell(row["desired"]))
    _print_rows(table, ("name", "current", "change", "why"))
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
        _print_rows([{**r, "current": _cell(r["current"]), "desired": _cell(r["desired"])}
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


def _xdp(args: argparse.Namespace) -> tuple[Any, Any]:
    from appliance.xdp import Filter

    appliance = _appliance(args)
    if getattr(args, "pin_dir", None):
        appliance = cfg.replace_value(appliance, "xdp", "pin_dir", args.pin_dir)
    return appliance, Filter(appliance)


def _xdp_nics(args: argparse.Namespace, appliance: Any) -> list[str]:
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
            socket_path = stack.enter_context(forward(args.ssh, args.remote_socket))
            title = f"{args.ssh}:{args.remote_socket}"
        else:
            socket_path = _control_socket(args)
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
                         Path(args.config) if args.config else None, yes=args.yes)
    print(f"wrote {result['bytes']:,} bytes to {result['device']} in {result['seconds']} s, "
          f"verified sha256 {result['sha256'][:16]}"
          + (f"; site config {result['config']} with {len(result['keys'])} origin keys"
             if result["config"] else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.supervisor.client import call, stale_for, sync_line

    status = call(_control_socket(args), "GET", "/v1/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    snap = status["snapshot"]
    stale = stale_for(status, time.time())
    if stale:
        # The supervisor answered, but its health loop has not run for a while: the figures
        # below are old, and saying so matters more than they do.
        print(f"STALE: the supervisor's last health round was {stale:.0f} s ago (every "
              f"{status['health_interval']:g} s expected); the figures below are that old")
    print(f"{status['pop']}: {'ready' if status['ready'] else 'NOT ready'} - {status['summary']}")
    print(f"snapshot: v{snap['version'] or '-'} {snap['sha256'][:16]}")
    level, text = sync_line(status.get("sync", {}))
    print(f"  {'sync':8} {dict(ok='ok', warn='PIN', bad='FAIL')[level]:4} {text}")
    for name, comp in status["components"].items():
        print(f"  {name:8} {'ok' if comp['ok'] else 'FAIL':4} {comp.get('reason', '')}")
    tuning = status.get("tuning", {})
    if not tuning.get("enabled"):
        print(f"  tuning   off  {tuning.get('reason', '')}")
    else:
        drifting = tuning["drifting"]
        print(f"  tuning   {'ok' if not drifting else 'DRIFT':4} "
              + (f"drifting: {', '.join(drifting)}; " if drifting else "")
              + f"{tuning['repairs']} repairs, irqbalance {tuning['irqbalance']}"
              + (f"; {tuning['error']}" if tuning["error"] else ""))
    return 0 if status["ready"] and not stale else 1


def _control_write(route: str, body: dict[str, Any] | None = None) -> Callable[..., int]:
    def command(args: argparse.Namespace) -> int:
        from appliance.supervisor.client import call

        print(call(_control_socket(args), "POST", route, body)["message"])
        return 0
    return command


def cmd_rollback(args: argparse.Namespace) -> int:
    return _control_write("/v1/rollback", {"to": args.to} if args.to is not None else {})(args)


def cmd_up(args: argparse.Namespace) -> int:
    from appliance.up import up

    return up(Path(args.state), Path(args.campaigns) if args.campaigns else None, args.port,
              {"origin": args.origin_port, "push": args.push_port, "cache": args.cache_port})


def _appliance_flags(p: argparse.ArgumentParser, state: bool = True) -> None:
    """--config and --state, as every command that reads the appliance configuration has
    them (`_appliance(args)` reads them back)."""
    p.add_argument("--config", help="appliance configuration file")
    if state:
        p.add_argument("--state", help="state directory (overrides paths.state_dir)")


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


def _needs_root(args: argparse.Namespace, what: str) -> None:
    """Writing the host's kernel settings needs root; say so in one line before trying."""
    if not args.root and os.geteuid() != 0:
        raise AdpopError(f"adpop tune {what} writes kernel settings under /proc and /sys and "
                         "needs root", hint=f"run it as root (sudo adpop tune {what}); "
                         "`adpop tune apply --dry-run` shows what it would write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adpop", description="adpop edge PoP appliance")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the installed adpop version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="show and check configuration").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = config.add_parser("dump", help="print the effective configuration as TOML")
    p.add_argument("--config", help="configuration file (drop-ins in NAME.d/ are applied)")
    p.add_argument("--kind", choices=[s.value for s in cfg.Scope],
                   help="appliance or origin (default: from the file name)")
    p.set_defaults(func=cmd_config_dump)
    p = config.add_parser("check", help="check configuration files; exit 2 listing problems")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--kind", choices=[s.value for s in cfg.Scope],
                   help="appliance or origin (default: from the file name)")
    p.set_defaults(func=cmd_config_check)

    keys = commands.add_parser("keys", help="signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = keys.add_parser("generate", help="write a new Ed25519 key pair <keyid>.key/.pub")
    p.add_argument("--out", required=True, help="folder for the key pair")
    p.set_defaults(func=cmd_keys_generate)

    snap = commands.add_parser("snapshot", help="campaign snapshots").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = snap.add_parser("synth", help="write a realistic synthetic campaign set")
    p.add_argument("--campaigns", type=int, required=True, help="number of campaigns")
    p.add_argument("--seed", type=int, default=1, help="random seed (same seed, same set)")
    p.add_argument("--out", required=True, help="folder to write campaign files into")
    p.set_defaults(func=cmd_snapshot_synth)
    p = snap.add_parser("build", help="compile and sign campaigns into a snapshot folder")
    p.add_argument("--campaigns", required=True, help="folder of .toml/.json campaign files")
    p.add_argument("--version", type=int, required=True, help="snapshot version (integer >= 1)")
    p.add_argument("--key", action="append", help="signing key file (repeat for more)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ttl", help="validity, e.g. 7d (default: origin snapshot.ttl)")
    p.add_argument("--group", help="target group (default: origin snapshot.target_group)")
    p.add_argument("--previous", help="payload SHA-256 of the previous snapshot")
    p.add_argument("--created", help="creation time (Unix seconds or ISO 8601; default: "
                   "SOURCE_DATE_EPOCH, else now): fixed, two builds are byte-identical")
    p.add_argument("--config", help="origin configuration file for defaults")
    p.set_defaults(func=cmd_snapshot_build)
    p = snap.add_parser("verify", help="verify a snapshot folder; exit 2 naming the failed check")
    p.add_argument("folder")
    p.add_argument("--trust", action="append", help="trusted .pub file or folder (repeat)")
    p.add_argument("--threshold", type=int, default=1, help="signatures required (default 1)")
    p.add_argument("--group", help="require this target group")
    p.add_argument("--config", help="appliance configuration: trust, threshold, group, limits")
    p.set_defaults(func=cmd_snapshot_verify)
    p = snap.add_parser("inspect", help="show a snapshot's version, hash, sizes and index")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_snapshot_inspect)
    p = snap.add_parser("install", help="verify a snapshot folder, store it and activate it")
    p.add_argument("folder")
    _appliance_flags(p, state=False)
    p.set_defaults(func=cmd_snapshot_install)
    p = snap.add_parser("list", help="list stored snapshot versions")
    _appliance_flags(p, state=False)
    p.set_defaults(func=cmd_snapshot_list)

    origin = commands.add_parser("origin", help="the central origin").add_subparsers(
        dest="action", required=True, metavar="ACTION")

    def origin_parser(name: str, help_text: str, func: Handler,
                      sub: Any = origin) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
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

    p = commands.add_parser("supervisor", help="run the supervisor (systemd's ExecStart)")
    _appliance_flags(p)
    p.add_argument("--keep-parts", action="store_true",
                   help="dev mode: the engine and the cache outlive this supervisor and the next "
                   "one adopts them (`adpop up` restarts a supervisor that dies)")
    p.set_defaults(func=cmd_supervisor)
    for name, help_text, func in (
            ("status", "the PoP's status from its supervisor", cmd_status),
            ("sync-now", "ask the supervisor to sync with the origin now",
             _control_write("/v1/sync-now")),
            ("rollback", "activate a retained older snapshot (default: the previous one)",
             cmd_rollback),
            ("drain", "stop taking new connections; requests in flight finish",
             _control_write("/v1/drain")),
            ("undrain", "take new connections again", _control_write("/v1/undrain"))):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--socket", help="the control socket (default: from the configuration)")
        _appliance_flags(p)
        if name == "status":
            p.add_argument("--json", action="store_true", help="the whole status as JSON")
        if name == "rollback":
            p.add_argument("--to", type=int, help="the version to activate")
        p.set_defaults(func=func)
    engine = commands.add_parser("engine", help="the serving engine").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = engine.add_parser("run", help="exec the engine as the configuration says "
                          "(adpop-engine.service's ExecStart)")
    _appliance_flags(p)
    p.set_defaults(func=cmd_engine_run)
    cache_cmd = commands.add_parser("cache", help="the local cache").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = cache_cmd.add_parser("run", help="exec the cache server as the configuration says "
                             "(the cache unit's ExecStart)")
    p.add_argument("--server", choices=("redis", "dragonfly"), default="redis")
    p.add_argument("--binary", help="the server binary (default: cache.binary)")
    _appliance_flags(p)
    p.set_defaults(func=cmd_cache_run)
    p = cache_cmd.add_parser("secrets", help="make the cache password and the servers' files "
                             "naming it, 0600, when missing (adpop-secrets.service)")
    _appliance_flags(p)
    p.set_defaults(func=cmd_cache_secrets)
    units_cmd = commands.add_parser("units", help="systemd integration").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = units_cmd.add_parser("generate", help="write the configuration's unit drop-ins "
                             "(the systemd generator)")
    p.add_argument("normal_dir", help="the generator's normal directory")
    p.add_argument("early_dir", nargs="?", help="unused (systemd passes it)")
    p.add_argument("late_dir", nargs="?", help="unused (systemd passes it)")
    _appliance_flags(p, state=False)
    p.set_defaults(func=cmd_units_generate)
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
        _appliance_flags(p)
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
        _appliance_flags(p, state=False)
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
    p = commands.add_parser("console", help="the operator console (Textual)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the control socket (default: from the configuration)")
    where.add_argument("--ssh", metavar="USER@HOST", help="a remote PoP, through ssh")
    p.add_argument("--remote-socket", default="/run/adpop/control.sock",
                   help="the control socket on the remote PoP")
    p.add_argument("--read-only", action="store_true", help="hide every action that writes")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between reads")
    _appliance_flags(p)
    p.set_defaults(func=cmd_console)
    p = commands.add_parser("flash", help="write the appliance image to a disk")
    p.add_argument("image", nargs="?",
                   help="the .raw image (images/out/adpop-VERSION.raw); none: list the disks")
    p.add_argument("--device", help="the whole disk to write (none: list the candidates)")
    p.add_argument("--config", help="the site's configuration drop-in (PoP id, origin, keys)")
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

    pop = commands.add_parser("pop", help="this PoP's snapshots").add_subparsers(
        dest="action", required=True, metavar="ACTION")

    def pop_parser(name: str, help_text: str, func: Handler) -> argparse.ArgumentParser:
        p = pop.add_parser(name, help=help_text)
        _appliance_flags(p)
        p.set_defaults(func=func)
        return p

    p = pop_parser("sync", "run the PoP side of sync (push listener and poll)", cmd_pop_sync)
    p.add_argument("--once", action="store_true", help="one sync, then exit (1 on a refusal)")
    pop_parser("snapshots", "retained snapshot versions", cmd_snapshot_list)
    p = pop_parser("trust", "trust a public key (an origin's .pub)", cmd_pop_trust)
    p.add_argument("file")
    p = pop_parser("rollback", "activate a retained older version", cmd_pop_rollback)
    p.add_argument("--to", type=int, help="version (default: the one below the active)")
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


if __name__ == "__main__":
    sys.exit(main())
