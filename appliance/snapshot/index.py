"""Walk the compiled k-index of a payload: the reference the C++ engine's matcher follows.

Matching (Whang et al., VLDB 2009), with one cursor per ATTRIBUTE rather than per value: a
request with several values of one attribute (segments, keywords) merges that attribute's
posting lists into one cursor, so a conjunction's attribute counts once however many of the
request's values hit it, and a NOT IN hit on any value marks the attribute as NOT IN.

For K from the largest conjunction size down to 0, a conjunction of size K matches when K
attribute cursors (at least one, the Z list standing in at K=0) sit on it with IN entries and
no cursor sits on it with a NOT IN entry.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.snapshot.model import ATTRIBUTES

_EOL = 1 << 62  # past every real entry


class _Cursor:
    __slots__ = ("entries", "pos")

    def __init__(self, entries: Sequence[int]) -> None:
        self.entries = entries
        self.pos = 0

    @property
    def current(self) -> int:
        return self.entries[self.pos] if self.pos < len(self.entries) else _EOL

    def skip_to(self, conj_id: int) -> None:
        """Advance to the first entry of a conjunction >= conj_id (NOT IN entry first)."""
        self.pos = bisect.bisect_left(self.entries, conj_id << 1, self.pos)


@dataclass(frozen=True)
class TargetingIndex:
    """The payload's k-index copied into Python lists (the engine reads it in place)."""

    ordinals: tuple[Mapping[str, int], ...]  # per attribute: value -> ordinal
    buckets: tuple[Mapping[tuple[int, int], Sequence[int]], ...]  # per K: (attr, ord) -> entries
    zero: Sequence[int]
    conjunction_campaigns: tuple[tuple[int, ...], ...]

    @classmethod
    def from_payload(cls, payload: Any) -> TargetingIndex:
        index = payload.index
        names = [a.name for a in index.attributes]
        if tuple(names) != ATTRIBUTES:
            raise ValueError(f"payload attributes {names} differ from this build's {ATTRIBUTES}")
        ordinals = tuple({v: i for i, v in enumerate(a.values)} for a in index.attributes)
        buckets = tuple(
            {(pl.attribute, pl.value): list(pl.entries) for pl in bucket.lists}
            for bucket in index.buckets
        )
        flat = list(index.conjunctionCampaigns)
        conj = tuple(
            tuple(flat[c.campaignsStart:c.campaignsStart + c.campaignsCount])
            for c in index.conjunctions
        )
        return cls(ordinals, buckets, list(index.zeroEntries), conj)

    def matching_conjunctions(self, request: Mapping[str, Sequence[str]]) -> set[int]:
        """Ids of the conjunctions the request satisfies."""
        # Per attribute, the request's value ordinals (values the index never mentions
        # cannot hit any posting list and are dropped here).
        wanted: list[tuple[int, list[int]]] = []
        for a, name in enumerate(ATTRIBUTES):
            table = self.ordinals[a]
            found = [table[v] for v in request.get(name, ()) if v in table]
            if found:
                wanted.append((a, found))
        matched: set[int] = set()
        for k in range(len(self.buckets) - 1, -1, -1):
            bucket = self.buckets[k]
            cursors: list[_Cursor] = []
            for a, ords in wanted:
                merged = _merge_attribute([bucket.get((a, o), ()) for o in ords])
                if merged:
                    cursors.append(_Cursor(merged))
            if k == 0 and self.zero:
                cursors.append(_Cursor(self.zero))
            need = max(k, 1)
            if len(cursors) < need:
                continue
            _walk(cursors, need, matched)
        return matched

    def matching_campaigns(self, request: Mapping[str, Sequence[str]]) -> set[int]:
        """Indexes of the campaigns (in payload order) the request's targeting selects."""
        campaigns: set[int] = set()
        for cid in self.matching_conjunctions(request):
            campaigns.update(self.conjunction_campaigns[cid])
        return campaigns


def _merge_attribute(lists: Sequence[Sequence[int]]) -> list[int]:
    """One cursor's entries for an attribute: per conjunction one entry, NOT IN if any is."""
    if len(lists) == 1:
        return _dedupe(lists[0])
    best: dict[int, int] = {}
    for entries in lists:
        for e in entries:
            cid = e >> 1
            prior = best.get(cid)
            if prior is None or e < prior:
                best[cid] = e
    return sorted(best.values())


def _dedupe(entries: Sequence[int]) -> list[int]:
    # A conjunction may carry IN and NOT IN on the same attribute value; NOT IN sorts first.
    out: list[int] = []
    for e in entries:
        if not out or out[-1] >> 1 != e >> 1:
            out.append(e)
    return out


def _walk(cursors: list[_Cursor], k: int, matched: set[int]) -> None:
    while True:
        cursors.sort(key=lambda c: c.current)
        if cursors[k - 1].current == _EOL:
            return
        first = cursors[0].current
        kth = cursors[k - 1].current
        if first >> 1 == kth >> 1:
            cid = first >> 1
            if first & 1:
                matched.add(cid)
            else:
                # A NOT IN entry sorts first for its conjunction: reject it, and move every
                # cursor beyond K that also sits on it.
                for c in cursors[k:]:
                    if c.current >> 1 == cid:
                        c.skip_to(cid + 1)
                    else:
                        break
            next_id = cid + 1
        else:
            next_id = kth >> 1
        for c in cursors[:k]:
            c.skip_to(next_id)
