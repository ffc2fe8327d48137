"""A snapshot on disk as a folder: `manifest.json` + `payload.capnp`. Build, write, inspect."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance import config as cfg
from appliance.errors import AdpopError
from appliance.snapshot.compiler import (
    CompileStats,
    compile_payload,
    open_payload,
    schema_id,
    string_table,
)
from appliance.snapshot.manifest import (
    MANIFEST_NAME,
    PAYLOAD_NAME,
    Manifest,
    Policy,
    SigningKey,
    load_trust,
    sign,
)
from appliance.snapshot.model import CampaignSet


class BundleError(AdpopError):
    """A snapshot folder cannot be written or read."""


@dataclass(frozen=True)
class Bundle:
    manifest: Manifest
    manifest_bytes: bytes
    payload: bytes
    stats: CompileStats


def build(campaign_set: CampaignSet, version: int, keys: Sequence[SigningKey], *,
          ttl: int, target_group: str, previous_sha256: str = "",
          now: int | None = None, allow_jump: bool = False, unsigned: bool = False) -> Bundle:
    """Compile and sign: the whole of turning campaigns into a publishable snapshot.
    `unsigned`: no manifest signature, for the origin, whose TUF targets vouch for it."""
    if version < 1:
        raise BundleError(f"version {version} is not positive", hint="versions start at 1")
    if not keys and not unsigned:
        raise BundleError("no signing key given", hint="pass --key FILE")
    created = int(time.time()) if now is None else now
    payload, stats = compile_payload(campaign_set, version, created)
    manifest = Manifest(
        schema_id=schema_id(), version=version, created=created, expires=created + ttl,
        payload_sha256=hashlib.sha256(payload).hexdigest(), payload_length=len(payload),
        previous_sha256=previous_sha256, target_group=target_group, allow_jump=allow_jump,
    )
    return Bundle(manifest, sign(manifest, keys), payload, stats)


def write(bundle: Bundle, out: Path) -> None:
    """Write the bundle into `out` (created); payload first, so a manifest never lacks it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in ((PAYLOAD_NAME, bundle.payload), (MANIFEST_NAME, bundle.manifest_bytes)):
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
    except OSError as exc:
        raise BundleError(f"cannot write snapshot to {out}: {exc.strerror}",
                          hint="choose a writable --out folder") from exc


def policy(trust: Sequence[Path], *, threshold: int = 1, target_group: str | None = None,
           **limits: int) -> Policy:
    """`limits`: clock_skew, max_manifest_bytes, max_payload_bytes (default: the settings'
    defaults, which Policy carries)."""
    return Policy(trusted=load_trust(trust), threshold=threshold, schema_id=schema_id(),
                  target_group=target_group, **limits)


def policy_for(snap: cfg.SnapshotSettings, target_group: str) -> Policy:
    """The checks a PoP's [snapshot] settings ask for besides trust (which TUF gives:
    sync.trust), for its group."""
    return Policy(trusted={}, schema_id=schema_id(), target_group=target_group,
                  clock_skew=snap.clock_skew, max_manifest_bytes=snap.max_manifest_bytes,
                  max_payload_bytes=snap.max_payload_bytes)


def describe(manifest: Manifest, payload: bytes,
             nesting_limit: int = cfg.SnapshotSettings.nesting_limit
             ) -> dict[str, Any]:
    """What `snapshot inspect` shows: manifest fields, sizes, counts and index statistics."""
    with open_payload(payload, nesting_limit) as p:
        index = p.index
        bucket_lists = [len(b.lists) for b in index.buckets]
        conj_by_k: dict[int, int] = {}
        for c in index.conjunctions:
            conj_by_k[c.size] = conj_by_k.get(c.size, 0) + 1
        longest = 0
        for bucket in index.buckets:
            for pl in bucket.lists:
                longest = max(longest, len(pl.entries))
        counts = {
            "advertisers": len(p.advertisers), "creatives": len(p.creatives),
            "campaigns": len(p.campaigns), "ads": len(p.ads), "placements": len(p.placements),
            "strings": len(p.stringOffsets) - 1, "paused_skipped": p.stats.pausedSkipped,
        }
        index_stats = {
            "conjunctions": len(index.conjunctions),
            "conjunctions_by_size": {str(k): v for k, v in sorted(conj_by_k.items())},
            "posting_lists_by_size": {str(k): n for k, n in enumerate(bucket_lists)},
            "posting_entries": p.stats.postingEntries,
            "longest_posting_list": longest,
            "zero_entries": len(index.zeroEntries),
            "attribute_values": {a.name: len(a.values) for a in index.attributes},
        }
        strings = string_table(p)
        placement_names = {
            strings[pl.id]: len({c for part in pl.partitions for t in part.tiers
                                 for c in t.campaigns})
            for pl in p.placements
        }
    return {
        "manifest": asdict(manifest),
        "payload_bytes": len(payload),
        "counts": counts,
        "index": index_stats,
        "placement_candidates": placement_names,
    }
