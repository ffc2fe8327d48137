"""Publishing: compile the stored campaigns as the next version, list it in the TUF targets
(what PoPs trust), start its rollout."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.config import OriginConfig
from appliance.origin import rollout
from appliance.origin.db import OriginDB
from appliance.origin.tuf_repo import MAX_TARGETS, Repository
from appliance.snapshot import bundle
from appliance.snapshot.manifest import target_path


@dataclass(frozen=True)
class Published:
    version: int
    sha256: str
    length: int
    campaigns: int
    stage: str


def repository(origin: OriginConfig) -> Repository:
    """The origin's TUF repository, made the first time it is needed."""
    snap = origin.snapshot
    return Repository.open(Path(origin.origin.state_dir) / "tuf", snap.root_keys,
                           snap.root_threshold)


def list_manifest(repo: Repository, manifest: bytes) -> None:
    """Lists a stored manifest as a TUF target: its exact bytes are then what PoPs accept."""
    signed = json.loads(manifest)["signed"]
    version = int(signed["version"])
    repo.add_target(target_path(str(signed["target_group"]), version), len(manifest),
                    hashlib.sha256(manifest).hexdigest(), {"version": version})


def reconcile(db: OriginDB, repo: Repository) -> list[int]:
    """Lists the stored versions the targets lack (published before the origin kept TUF
    metadata); returns those versions."""
    listed = set(repo.load("targets").signed.targets)
    missing = []
    for row in db.versions()[-MAX_TARGETS:]:  # older ones the targets no longer keep
        manifest = db.manifest(row.version)
        if manifest is None:
            continue
        group = str(json.loads(manifest)["signed"]["target_group"])
        if target_path(group, row.version) not in listed:
            list_manifest(repo, manifest)
            missing.append(row.version)
    return missing


def publish(db: OriginDB, origin: OriginConfig, allow_jump: bool = False) -> Published:
    """The next version from what the store holds now; raises CampaignError on bad campaigns."""
    repo = repository(origin)
    plan = rollout.plan_from_config(origin)
    version = db.next_version()
    built = bundle.build(db.campaign_set(), version, [], ttl=origin.snapshot.ttl,
                         target_group=origin.snapshot.target_group,
                         previous_sha256=db.latest_sha256(), allow_jump=allow_jump,
                         unsigned=True)
    stage = rollout.first_stage(db.pops(), plan)
    # Listed, then stored, under the publish lock; reconcile() lists any version that a
    # publish of an older release stored without it.
    db.add_version(version, built.manifest_bytes, built.payload, built.manifest.payload_sha256,
                   built.stats.campaigns, built.manifest.created, stage,
                   vouch=lambda: list_manifest(repo, built.manifest_bytes))
    return Published(version, built.manifest.payload_sha256, len(built.payload),
                     built.stats.campaigns, stage)
