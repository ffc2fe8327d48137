"""Snapshot distribution: notice-to-active at one PoP, and fan-out from publish to 20 PoPs.

Prints, from one run:
- notice-to-active at a PoP for 1k, 100k and 1M-campaign snapshots (p50 of 5): an update
  from the previous version of the same size, fetched from a real origin process over
  loopback, every check (the jump hold included), and activation in the store; compiling is
  the origin's and not counted (goal: p50 <= 100 ms at 100k). Beside it, the same bytes
  copied with `cp` and hashed with `sha256sum`, as a floor measured in the same run.
- fan-out: 20 `adpop pop sync` processes; each publish's time until each PoP reports the
  version active, p50 and p99 over 5 publishes (goal: p99 <= 1 s), over mutual TLS (the
  PoPs enrolled, pushes to their enrolled addresses) beside plain HTTP in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from appliance import config as cfg
from appliance.origin.ca import Authority
from appliance.origin.db import OriginDB
from appliance.origin.publish import list_manifest
from appliance.origin.tuf_repo import Repository
from appliance.snapshot import bundle, synth
from appliance.snapshot.manifest import SigningKey, generate_key, load_signing_key
from appliance.snapshot.model import parse_documents
from appliance.snapshot.store import SnapshotStore
from appliance.sync.agent import SyncAgent
from appliance.up import free_port, root_json
from bench.common import wait_http

REPO = Path(__file__).resolve().parent.parent
ADPOP = [sys.executable, "-m", "appliance.cli"]


def origin_with(work: Path, name: str, bundles: list[bundle.Bundle], extra: str = "",
                campaigns: Path | None = None, tls: bool = False
                ) -> tuple[subprocess.Popen[bytes], int, Path]:
    """An `adpop origin serve` process holding `bundles` as released versions (and the
    campaign files in `campaigns`, for publishing more), over TLS from its private CA or
    plain HTTP."""
    state = work / name
    db = OriginDB(state)
    repo = Repository.open(state / "tuf")
    if campaigns is not None:
        db.import_dir(campaigns)
    for b in bundles:
        db.add_version(b.manifest.version, b.manifest_bytes, b.payload,
                       b.manifest.payload_sha256, b.stats.campaigns, b.manifest.created, "done",
                       vouch=partial(list_manifest, repo, b.manifest_bytes))
    db.close()
    if tls:
        Authority.open(state / "ca")  # made now, so its certificate is there to trust
    port = free_port()
    conf = work / f"{name}.toml"
    conf.write_text(f'[origin]\nlisten = "127.0.0.1:{port}"\n'
                    f'state_dir = "{state}"\ntls = "{"private-ca" if tls else "off"}"\n{extra}')
    proc = subprocess.Popen([*ADPOP, "origin", "serve", "--config", str(conf)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/ca", context=origin_ca(state)
              if tls else None)
    return proc, port, conf


def origin_ca(state: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(state / "ca" / "ca.pem"))


def pop_config(work: Path, name: str, origin: str, port: int, push: str = "",
               tls: bool = False) -> Path:
    conf = work / f"{name}.toml"
    conf.write_text(f'[pop]\nid = "{name}"\n[paths]\nstate_dir = "{work / name}"\n'
                    f'[snapshot]\ntrust_root = "{root_json(work / origin)}"\n'
                    f'[sync]\norigin_url = "{"https" if tls else "http"}://127.0.0.1:{port}"\n'
                    f'push_listen = "{push}"\nhealth_window = 0\npoll_interval = "30s"\n')
    return conf


async def notice_to_active(work: Path, origin: str, port: int, previous: bundle.Bundle,
                           rounds: int                           ) -> list[float]:
    """An update, as a PoP sees it: `previous` active, the origin's newer version taken."""
    times = []
    for r in range(rounds):
        state = work / f"pop-{port}-{r}"
        appliance = cfg.load(cfg.Scope.APPLIANCE, pop_config(work, f"pop-{port}-{r}", origin,
                                                                    port))
        store = SnapshotStore(state)
        store.install(previous.manifest.version, previous.manifest_bytes, previous.payload)
        agent = SyncAgent.from_config(appliance, store)
        async with ClientSession() as session:
            agent.session = session
            started = time.monotonic()
            taken = await agent.sync_once()
            times.append(time.monotonic() - started)
            assert taken is not None and taken.version == previous.manifest.version + 1, \
                agent.state.error
        shutil.rmtree(state)
    return times


def floor_seconds(payload: Path, work: Path) -> float:
    started = time.monotonic()
    subprocess.run(["cp", str(payload), str(work / "copy")], check=True)
    subprocess.run(["sha256sum", str(work / "copy")], check=True, capture_output=True)
    elapsed = time.monotonic() - started
    (work / "copy").unlink()
    return elapsed


def fan_out(work: Path, keys: list[SigningKey], pops: int, publishes: int, tls: bool
            ) -> list[float]:
    documents = synth.generate(1000, seed=5)
    synth.write(documents, work / "fan-campaigns")
    first = bundle.build(parse_documents(documents), 1, keys, ttl=86400, target_group="default")
    name = f"fanout-origin-{'tls' if tls else 'plain'}"
    proc, port, conf = origin_with(work, name, [first],
                                   "[rollout]\ncanaries = []\npercent = 100\n",
                                   work / "fan-campaigns", tls)
    children = []
    try:
        for i in range(pops):
            pop = f"fan-{'tls' if tls else 'plain'}-{i:02d}"
            if tls:  # enrolled as an operator would, each with a token of its own
                subprocess.run([*ADPOP, "origin", "pops", "enroll", pop, "--out",
                                str(work / pop / "enroll-token"), "--config", str(conf)],
                               cwd=REPO, check=True, capture_output=True)
            children.append(subprocess.Popen(
                [*ADPOP, "pop", "sync", "--config",
                 str(pop_config(work, pop, name, port, f"127.0.0.1:{free_port()}", tls))],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        fleet_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/fleet"
        context = origin_ca(work / name) if tls else None
        token = subprocess.run([*ADPOP, "origin", "tokens", "create", "bench", "--config",
                                str(conf)], cwd=REPO, check=True, capture_output=True,
                               text=True).stdout.strip()
        request = urllib.request.Request(fleet_url, headers={"Authorization": f"Bearer {token}"})

        def fleet() -> list[dict[str, Any]]:
            with urllib.request.urlopen(request, timeout=5, context=context) as resp:
                pops_: list[dict[str, Any]] = json.loads(resp.read())["pops"]
                return pops_

        def wait_all(version: int) -> list[dict[str, Any]]:
            deadline = time.monotonic() + 60
            while True:
                rows = fleet()
                if len(rows) == pops and all(p["version"] == version and
                                             p["state"] == "active" for p in rows):
                    return rows
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fan-out: PoPs not on v{version}: {rows}")
                time.sleep(0.05)

        wait_all(1)
        samples = []
        for n in range(publishes):
            published = time.time()
            subprocess.run([*ADPOP, "origin", "publish", "--config", str(conf)], cwd=REPO,
                           check=True, capture_output=True)
            rows = wait_all(n + 2)
            samples += [p["activated"] - published for p in rows]
        return samples
    finally:
        for child in [*children, proc]:
            child.terminate()
        for child in [*children, proc]:
            child.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pops", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adpop-bench-sync-") as tmp:
        work = Path(tmp)
        key_path, _ = generate_key(work / "keys")
        keys = [load_signing_key(key_path)]
        print(f"{'campaigns':>10} {'payload MB':>11} {'notice-to-active p50':>21} "
              f"{'(min)':>8} {'cp + sha256sum':>15}")
        for size in (int(s) for s in args.sizes.split(",")):
            campaign_set = parse_documents(synth.generate(size, seed=7))
            previous, built = (bundle.build(campaign_set, v, keys, ttl=86400,
                                            target_group="default") for v in (1, 2))
            proc, port, _ = origin_with(work, f"origin-{size}", [previous, built])
            try:
                times = asyncio.run(notice_to_active(work, f"origin-{size}", port, previous,
                                                     args.rounds))
            finally:
                proc.terminate()
                proc.wait(timeout=20)
            floor = floor_seconds(work / f"origin-{size}" / "payloads" /
                                  f"{built.manifest.payload_sha256}.capnp", work)
            print(f"{size:>10} {len(built.payload) / 1e6:>11.1f} "
                  f"{statistics.median(times) * 1000:>18.0f} ms {min(times) * 1000:>5.0f} ms "
                  f"{floor * 1000:>12.0f} ms")
        print("  goal: p50 <= 100 ms at 100k campaigns (compile excluded)")
        for tls in (False, True):
            samples = sorted(fan_out(work, keys, args.pops, args.rounds, tls))
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            label = "mutual TLS:" if tls else "plain HTTP (baseline):"
            print(f"fan-out over {label:23} publish to {args.pops} PoPs active, "
                  f"{args.rounds} publishes: "
                  f"p50 {statistics.median(samples) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
        print("  goal: p99 <= 1000 ms over mutual TLS (the publish command's own start-up is "
              "included)")


if __name__ == "__main__":
    main()
