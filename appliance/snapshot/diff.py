"""What changed between two snapshots, campaign by campaign: for the console's Snapshots
screen (and anyone asking the control API) before a rollback."""

from __future__ import annotations

from typing import Any

from appliance.snapshot.compiler import open_payload, string_table

Fingerprint = tuple[Any, ...]


def campaigns(payload: bytes) -> dict[str, Fingerprint]:
    """Campaign id → the fields that decide how it serves."""
    with open_payload(payload) as p:
        strings = string_table(p)
        return {strings[c.id]: (c.priority, c.weight, c.ecpmMicros, c.start, c.end,
                                c.budgetTotalMicros, c.budgetDailyMicros, c.passThroughPpm,
                                c.adsCount, len(c.caps))
                for c in p.campaigns}


def diff(old: dict[str, Fingerprint], new: dict[str, Fingerprint]) -> dict[str, list[str]]:
    return {"added": sorted(new.keys() - old.keys()),
            "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(k for k in new.keys() & old.keys() if new[k] != old[k])}
