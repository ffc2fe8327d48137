"""The PoP's side of fleet budgets: check a signed allowance from the origin, hand it to the
engine, keep it for the engine's next start, and report demand back.

An allowance is believed only when the TUF timestamp role's keys, as named by the root this
PoP trusts (the newest its TUF client verified), signed it to the role's threshold, it names
this PoP, its sequence number is above the last one installed, and it has not expired. The
channel it came on (a poll answer or a push) is never what is trusted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import AdpopError
from appliance.origin.pacing import ALLOWANCE_TYPE, canonical

log = logging.getLogger("adpop.sync.allowances")

MAX_ALLOWANCE_BYTES = 8 * 1024**2


class AllowanceError(AdpopError):
    """An allowance that is not believed, with why."""

    unsigned = False  # short of the signatures: the PoP's root may be behind a key rotation


class UnsignedAllowance(AllowanceError):
    unsigned = True


@dataclass(frozen=True)
class Believed:
    seq: int
    expires_ms: int
    signed: dict[str, Any]  # what the engine is given
    raw: bytes  # the whole signed document, as kept on disk


def verify(raw: bytes, root_json: bytes, pop: str, newer_than: int,
           now_ms: int | None = None) -> Believed:
    """The allowance in `raw` if it is to be believed; raises AllowanceError."""
    from securesystemslib.exceptions import UnverifiedSignatureError
    from securesystemslib.signer._signature import Signature  # its home module (mypy)
    from tuf.api._payload import Root
    from tuf.api.metadata import Metadata

    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if len(raw) > MAX_ALLOWANCE_BYTES:
        raise AllowanceError(f"allowance of {len(raw)} bytes is over the "
                             f"{MAX_ALLOWANCE_BYTES} byte limit")
    try:
        doc = json.loads(raw)
        signed, signatures = doc["signed"], doc["signatures"]
        kind, named, seq, expires = (signed["type"], signed["pop"], int(signed["seq"]),
                                     int(signed["expires_ms"]))
        if not isinstance(signatures, list) or not isinstance(signed.get("campaigns"), list):
            raise TypeError("signatures and campaigns must be lists")
    except (ValueError, KeyError, TypeError) as exc:
        raise AllowanceError(f"malformed allowance: {exc}") from exc
    if kind != ALLOWANCE_TYPE:
        raise AllowanceError(f"not an allowance: type {str(kind)[:40]!r}")
    if named != pop:
        raise AllowanceError(f"allowance is for {str(named)[:64]!r}, not this PoP ({pop})")
    try:
        root = Metadata[Root].from_bytes(root_json).signed
    except (ValueError, KeyError, TypeError) as exc:
        raise AllowanceError(f"the trusted root cannot be read: {exc}",
                             hint="give the PoP the origin's root.json again") from exc
    role = root.roles["timestamp"]
    data = canonical(signed)
    good: set[str] = set()
    for entry in signatures:
        keyid = entry.get("keyid") if isinstance(entry, dict) else None
        if keyid not in role.keyids or keyid in good:
            continue
        try:
            root.keys[keyid].verify_signature(Signature(keyid, str(entry.get("sig", ""))),
                                              data)
        except UnverifiedSignatureError:
            continue
        good.add(keyid)
    if len(good) < role.threshold:
        raise UnsignedAllowance(f"allowance signed by {len(good)} of the {role.threshold} "
                                "timestamp keys this PoP's trusted root requires")
    if seq <= newer_than:
        raise AllowanceError(f"allowance {seq} is not newer than the installed {newer_than}")
    if expires <= now_ms:
        raise AllowanceError(f"allowance {seq} expired {(now_ms - expires) / 1000:.0f} s ago")
    return Believed(seq, expires, signed, raw)


def load(path: Path) -> bytes | None:
    """The allowance kept for the engine's next start, or None."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def keep(path: Path, raw: bytes) -> None:
    """Kept atomically; not fsynced: losing it costs one poll, never money (it expires)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


def demand(pacing: Mapping[str, Any]) -> dict[str, Any]:
    """The demand report the origin shares allowances by, from the engine's /pacing."""
    now_ms = int(time.time() * 1000)
    campaigns = {}
    for row in pacing.get("campaigns", []):
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            campaigns[row["id"]] = {"eligible": int(row.get("eligible", 0)),
                                    "throttled": int(row.get("throttled", 0)),
                                    "spent_micros": int(row.get("spent_micros", 0))}
    return {"day": now_ms // 86_400_000, "campaigns": campaigns}
