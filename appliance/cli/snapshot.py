"""`adpop keys` and `adpop snapshot`: signing keys, and building, checking and installing
snapshots by hand."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli.common import Commands, appliance_flags, store_of, utc
from appliance.errors import AdpopError

if TYPE_CHECKING:  # for annotations only: each command imports what it runs, so --help is fast
    from appliance.snapshot.manifest import Policy


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
    from appliance import config as cfg
    from appliance.snapshot import bundle
    from appliance.snapshot.manifest import load_signing_keys
    from appliance.snapshot.model import load_campaigns

    origin = cfg.load(cfg.Scope.ORIGIN, Path(args.config) if args.config else None)
    if not args.key:
        raise AdpopError("no signing key given", hint="pass --key FILE (an Ed25519 .key made "
                         "by `adpop snapshot keygen`); the origin's publishes are trusted "
                         "through TUF instead")
    keys = load_signing_keys([Path(k) for k in args.key])
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


def _verify_policy(args: argparse.Namespace) -> Policy:
    from appliance import config as cfg
    from appliance.snapshot import bundle

    if not args.trust:
        raise AdpopError("no trusted keys given", hint="pass --trust PUBFILE_OR_DIR")
    group = args.group
    limits: dict[str, int] = {}
    if getattr(args, "config", None):
        appliance = cfg.load(cfg.Scope.APPLIANCE, Path(args.config))
        snap = appliance.snapshot
        group = group or appliance.pop.target_group
        limits = {"clock_skew": snap.clock_skew, "max_manifest_bytes": snap.max_manifest_bytes,
                  "max_payload_bytes": snap.max_payload_bytes}
    return bundle.policy([Path(t) for t in args.trust], threshold=args.threshold,
                         target_group=group, **limits)


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
    print(f"created        {utc(m['created'])}   expires {utc(m['expires'])}")
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


def cmd_snapshot_install(args: argparse.Namespace) -> int:
    from appliance.snapshot.manifest import VerifyError, verify_dir

    _, store = store_of(args)
    try:
        manifest, payload = verify_dir(Path(args.folder), _verify_policy(args))
    except VerifyError as exc:
        print(f"adpop: install refused: {exc.line()}", file=sys.stderr)
        return 2
    manifest_bytes = (Path(args.folder) / "manifest.json").read_bytes()
    path = store.install(manifest.version, manifest_bytes, payload)
    print(f"installed and activated version {manifest.version} at {path}")
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    _, store = store_of(args, create=False)
    rows = store.listing()
    if not rows:
        print(f"no snapshots stored under {store.root}")
        return 0
    print(f"{'version':>8}  {'state':8}  path   (high-water {store.high_water()})")
    for row in rows:
        print(f"{row.version:>8}  {'active' if row.active else 'retained':8}  {row.path}")
    return 0


def register(commands: Commands) -> None:
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
    p.add_argument("--config", help="appliance configuration: group and limits")
    p.set_defaults(func=cmd_snapshot_verify)
    p = snap.add_parser("inspect", help="show a snapshot's version, hash, sizes and index")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_snapshot_inspect)
    p = snap.add_parser("install", help="verify a snapshot folder, store it and activate it")
    p.add_argument("folder")
    p.add_argument("--trust", action="append", help="trusted .pub file or folder (repeat)")
    p.add_argument("--threshold", type=int, default=1, help="signatures required (default 1)")
    p.set_defaults(group=None)
    appliance_flags(p, state=False)
    p.set_defaults(func=cmd_snapshot_install)
    p = snap.add_parser("list", help="list stored snapshot versions")
    appliance_flags(p, state=False)
    p.set_defaults(func=cmd_snapshot_list)
