"""Publishing: compile the stored campaigns, sign them as the next version, start its rollout."""

from __future__ import annotations

from dataclasses import dataclass

from appliance import config as cfg
from appliance.config import OriginConfig
from appliance.origin import rollout
from appliance.origin.db import OriginDB
from appliance.snapshot import bundle
from appliance.snapshot.manifest import load_signing_keys


@dataclass(frozen=True)
class Published:
    version: int
    sha256: str
    length: int
    campaigns: int
    stage: str


def publish(db: OriginDB, origin: OriginConfig, allow_jump: bool = False) -> Published:
    """The next version from what the store holds now; raises CampaignError on bad campaigns."""
    keys = load_signing_keys(cfg.under(origin.origin.state_dir, k)
                             for k in origin.snapshot.signing_keys)
    plan = rollout.plan_from_config(origin)
    version = db.next_version()
    built = bundle.build(db.campaign_set(), version, keys, ttl=origin.snapshot.ttl,
                         target_group=origin.snapshot.target_group,
                         previous_sha256=db.latest_sha256(), allow_jump=allow_jump)
    stage = rollout.first_stage(db.pops(), plan)
    db.add_version(version, built.manifest_bytes, built.payload, built.manifest.payload_sha256,
                   built.stats.campaigns, built.manifest.created, stage)
    return Published(version, built.manifest.payload_sha256, len(built.payload),
                     built.stats.campaigns, stage)
