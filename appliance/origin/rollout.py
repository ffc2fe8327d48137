"""Staged rollouts: which PoPs may take a version, and when a version moves on or halts.

A version goes to the canaries first, then to `percent` of the other PoPs, then to all. A
stage moves on once each of its PoPs reports the version active after its health window; it
halts when one of them reports that the version failed (activation or health window), or
when it waits longer than `stage_timeout`. The last stage ("all") is not gated: once there,
the version is released, and a PoP that was away takes it when it comes back.

Decisions here are pure functions of the rows, so they are tested without a server.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.config import OriginConfig
from appliance.origin.db import STAGES, OriginDB, PopRow, VersionRow


@dataclass(frozen=True)
class Plan:
    canaries: tuple[str, ...]
    percent: int
    stage_timeout: float


def plan_from_config(origin: OriginConfig) -> Plan:
    return Plan(tuple(origin.rollout.canaries), origin.rollout.percent,
                float(origin.rollout.stage_timeout))


def members(stage: str, pops: Sequence[PopRow], plan: Plan) -> list[str]:
    """The PoPs a version at `stage` may go to (registered ones only)."""
    ids = sorted(p.id for p in pops)
    canaries = [i for i in ids if i in plan.canaries]
    if stage == "canary":
        return canaries
    others = [i for i in ids if i not in plan.canaries]
    if stage == "percent":
        return canaries + others[:math.ceil(len(others) * plan.percent / 100)]
    return ids


def first_stage(pops: Sequence[PopRow], plan: Plan) -> str:
    return "canary" if members("canary", pops, plan) else "percent"


def step(version: VersionRow, pops: Sequence[PopRow], plan: Plan, now: float
         ) -> tuple[str, str] | None:
    """The version's next (stage, halted reason), or None while it stays where it is."""
    if version.stage in ("done", "halted"):
        return None
    group = members(version.stage, pops, plan)
    by_id = {p.id: p for p in pops}
    failed = [i for i in group if by_id[i].failed_version == version.version]
    if failed:
        return "halted", f"{failed[0]} reported v{version.version} failed: " \
                         f"{by_id[failed[0]].last_error or 'no detail'}"
    waiting = [i for i in group
               if by_id[i].version < version.version or by_id[i].state != "active"]
    if waiting:
        if version.stage != "all" and now - version.stage_started > plan.stage_timeout:
            return "halted", f"stage {version.stage} timed out waiting for {', '.join(waiting)}"
        return None
    return STAGES[STAGES.index(version.stage) + 1], ""


def assigned_version(pop_id: str, versions: Sequence[VersionRow], pops: Sequence[PopRow],
                     plan: Plan) -> int:
    """The newest version this PoP may take now (0: none)."""
    for v in reversed(versions):
        if v.stage == "halted":
            continue
        # Released versions go to anyone, a PoP that registers later included.
        if v.stage in ("all", "done") or pop_id in members(v.stage, pops, plan):
            return v.version
    return 0


def advance(db: OriginDB, plan: Plan, versions: Sequence[VersionRow],
            pops: Sequence[PopRow], now: float | None = None) -> list[tuple[int, str]]:
    """Apply every due stage change to `db`; returns (version, new stage) for each."""
    clock = time.time() if now is None else now
    changes = []
    for version in versions:
        change = step(version, pops, plan, clock)
        if change is not None:
            db.set_stage(version.version, *change)
            changes.append((version.version, change[0]))
    return changes
