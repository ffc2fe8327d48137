"""Fleet budgets: every pacing interval the origin gives each PoP a signed allowance per
budgeted campaign, out of what the fleet has spent (the stored impressions), shared by the
PoPs' recent demand, along the campaign's pacing curve and inside its budgets.

An allowance is a cap on what one PoP may have spent on a campaign by the end of today (UTC),
valid until it expires. The PoP never passes it (engine/src/pacing.hpp) and serves the
campaign no more once it expires. The allocator keeps the sum of the caps a PoP may still be
holding inside the day's budget:

    for every campaign:  sum over PoPs of max(newest cap, any unexpired older cap) <= day cap

so even PoPs that never receive a newer, smaller allowance cannot overspend together. The
day's cap is the daily budget, or what is left of the total budget if that is less.

`allocate` is pure (the simulation bench drives it with simulated time); `PacingService` runs
it on the origin with the event store's spend and the PoPs' demand reports, and signs what
it gives with the TUF timestamp role's online key, which PoPs already trust through their
root (appliance/sync/allowances.py checks it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import AdpopError
from appliance.snapshot.model import Pacing

log = logging.getLogger("adpop.origin.pacing")

DAY_MS = 86_400_000
# An allowance stays good for this many intervals: a PoP that misses one or two rounds keeps
# serving, one cut off stops soon after.
LIFETIME_INTERVALS = 3
# A PoP that has not reported demand for this many intervals gets no new allowance.
SILENT_INTERVALS = 3
ALLOWANCE_TYPE = "adpop-allowance"


class PacingError(AdpopError):
    """An allowance could not be made or signed."""


def curve(pacing: Pacing, fraction: float) -> float:
    """The share of a day's budget to have spent by `fraction` (0-1) of the UTC day."""
    x = min(max(fraction, 0.0), 1.0)
    if pacing is Pacing.ASAP:
        return 1.0
    if pacing is Pacing.FRONTLOADED:
        return 1.5 * x - 0.5 * x * x  # half again the even rate at midnight, half at the end
    return x


@dataclass(frozen=True)
class Budget:
    """One budgeted campaign as the allocator needs it."""

    campaign: str
    daily_micros: int  # 0: none
    total_micros: int  # 0: none
    pacing: Pacing
    spent_before_today: int = 0  # fleet spend on earlier days (for the total budget)

    def day_cap(self) -> int:
        caps = []
        if self.daily_micros:
            caps.append(self.daily_micros)
        if self.total_micros:
            caps.append(max(0, self.total_micros - self.spent_before_today))
        return min(caps) if caps else 0


@dataclass
class Allowance:
    """What one PoP is given in one round (signed by PacingService)."""

    pop: str
    seq: int
    issued_ms: int
    interval_end_ms: int
    expires_ms: int
    day: int
    caps: dict[str, int]  # campaign -> micros this PoP may have spent today
    spent: dict[str, int]  # campaign -> this PoP's spend today as stored here

    def document(self) -> dict[str, Any]:
        return {"type": ALLOWANCE_TYPE, "pop": self.pop, "seq": self.seq,
                "issued_ms": self.issued_ms, "interval_end_ms": self.interval_end_ms,
                "expires_ms": self.expires_ms, "day": self.day,
                "campaigns": [{"id": c, "cap_micros": cap,
                               "origin_spent_micros": self.spent.get(c, 0)}
                              for c, cap in sorted(self.caps.items())]}


@dataclass
class Allocator:
    """The origin's allocation, one round per interval. Remembers the caps it gave that may
    still be in force, and the sequence number (only goes up, across restarts too: it starts
    from the clock)."""

    interval_ms: int = 10_000
    # Each round's expiry and caps (campaign -> PoP -> cap), while they may be in force.
    rounds: list[tuple[int, dict[str, dict[str, int]]]] = field(default_factory=list)
    # The newest cap each PoP was given today (campaign -> PoP -> cap): what a PoP that has
    # gone silent may still hold, since what it spent meanwhile is not known here yet.
    newest: dict[str, dict[str, int]] = field(default_factory=dict)
    seq: int = 0
    day: int = -1

    def allocate(self, now_ms: int, budgets: Iterable[Budget],
                 spent: Mapping[tuple[str, str], int], demand: Mapping[tuple[str, str], float],
                 pops: Collection[str]) -> dict[str, Allowance]:
        """Allowances for `pops` (those heard from recently) from the fleet's spend today by
        (PoP, campaign) and the PoPs' demand (eligible requests per second)."""
        day = now_ms // DAY_MS
        if day != self.day:
            self.day = day
            self.rounds.clear()  # yesterday's caps were yesterday's
            self.newest.clear()
        self.seq = max(self.seq + 1, now_ms)
        end = now_ms + self.interval_ms
        expires = now_ms + LIFETIME_INTERVALS * self.interval_ms
        fraction = (min(end, (day + 1) * DAY_MS) - day * DAY_MS) / DAY_MS
        live = set(pops)
        out = {p: Allowance(p, self.seq, now_ms, end, expires, day, {}, {}) for p in pops}
        self.rounds = [r for r in self.rounds if r[0] > now_ms]
        by_campaign: dict[str, dict[str, int]] = {}
        for (pop, campaign), micros in spent.items():
            by_campaign.setdefault(campaign, {})[pop] = micros
        wants: dict[str, dict[str, float]] = {}
        for (pop, campaign), rate in demand.items():
            if pop in live and rate > 0:
                wants.setdefault(campaign, {})[pop] = rate
        given: dict[str, dict[str, int]] = {}
        for budget in budgets:
            c = budget.campaign
            held: dict[str, int] = {}
            for p, cap in self.newest.get(c, {}).items():
                if p not in live:
                    held[p] = cap
            for _, caps in self.rounds:
                for p, cap in caps.get(c, {}).items():
                    if cap > held.get(p, 0):
                        held[p] = cap
            new = self._campaign(budget, fraction, by_campaign.get(c, {}), wants.get(c, {}),
                                 live, held)
            given[c] = new
            self.newest.setdefault(c, {}).update(new)
            for p, cap in new.items():
                out[p].caps[c] = cap
                out[p].spent[c] = by_campaign.get(c, {}).get(p, 0)
        self.rounds.append((expires, given))
        return out

    @staticmethod
    def _campaign(budget: Budget, fraction: float, spent: Mapping[str, int],
                  wants: Mapping[str, float], live: set[str],
                  held: Mapping[str, int]) -> dict[str, int]:
        """Each live PoP's new cap for one campaign."""
        if not live:
            return {}
        day_cap = budget.day_cap()
        target = min(day_cap * curve(budget.pacing, fraction), day_cap)
        increment = max(0.0, target - sum(spent.values()))
        total = sum(wants.values())
        share = {p: (wants.get(p, 0.0) / total if total > 0 else 1.0 / len(live)) for p in live}
        # PoPs that get nothing new still count with what they may hold or have spent.
        fixed = sum(max(spent.get(p, 0), held.get(p, 0))
                    for p in (set(spent) | set(held)) - live)

        def committed(k: float) -> float:
            return fixed + sum(max(spent.get(p, 0) + k * increment * share[p], held.get(p, 0))
                               for p in live)

        # The largest part of the increment that keeps every cap a PoP may hold inside the
        # day's budget (committed() rises with k, so halving finds it).
        k = 1.0
        if committed(1.0) > day_cap:
            lo, hi = 0.0, 1.0
            for _ in range(24):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if committed(mid) <= day_cap else (lo, mid)
            k = lo
        return {p: int(spent.get(p, 0) + k * increment * share[p]) for p in live}


class DemandBook:
    """The PoPs' demand reports: per campaign today, running totals of decisions that asked
    about it (eligible) and of those held back (throttled), and the PoP's own spend. Eligible
    totals become rates per second between two reports; the spend is fresher than the
    stored events (they ship a second or two later)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, tuple[float, int, dict[str, int]]] = {}  # pop -> (at, day, counts)
        self.rates: dict[tuple[str, str], float] = {}
        self.throttled: dict[tuple[str, str], int] = {}
        self.spent: dict[tuple[str, str], tuple[int, int]] = {}  # -> (day, micros)
        self.heard: dict[str, float] = {}

    def report(self, pop: str, day: int, counts: Mapping[str, tuple[int, int]],
               now: float, spent: Mapping[str, int] | None = None) -> None:
        eligible = {c: e for c, (e, _) in counts.items()}
        with self.lock:
            before = self.last.get(pop)
            if before is not None and before[1] == day and now > before[0]:
                for c, e in eligible.items():
                    rate = max(0, e - before[2].get(c, 0)) / (now - before[0])
                    old = self.rates.get((pop, c))
                    # Smoothed a little: one quiet interval should not hand a PoP's share away.
                    self.rates[(pop, c)] = rate if old is None else 0.5 * old + 0.5 * rate
            elif before is not None and before[1] != day:
                for key in [k for k in self.rates if k[0] == pop]:
                    del self.rates[key]
            for c, (_, t) in counts.items():
                self.throttled[(pop, c)] = t
            for c, micros in (spent or {}).items():
                self.spent[(pop, c)] = (day, micros)
            self.last[pop] = (now, day, eligible)
            self.heard[pop] = now

    def live(self, now: float, interval: float) -> list[str]:
        with self.lock:
            return sorted(p for p, at in self.heard.items()
                          if now - at <= SILENT_INTERVALS * interval)

    def snapshot(self) -> dict[tuple[str, str], float]:
        with self.lock:
            return dict(self.rates)

    def reported_spend(self, day: int) -> dict[tuple[str, str], int]:
        with self.lock:
            return {k: micros for k, (d, micros) in self.spent.items() if d == day}


def canonical(signed: Mapping[str, Any]) -> bytes:
    """The bytes an allowance's signatures are over."""
    return json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()


def sign(signed: Mapping[str, Any], signer: Any) -> bytes:
    """A signed allowance document: {"signed": ..., "signatures": [{"keyid", "sig"}]}."""
    signature = signer.sign(canonical(signed))
    return json.dumps({"signed": signed, "signatures": [
        {"keyid": signature.keyid, "sig": signature.signature}]},
        sort_keys=True, separators=(",", ":")).encode()


class PacingService:
    """The origin's pacing: a round every interval from the event store's spend (and the
    PoPs' fresher reports of their own), the campaign store's budgets and the PoPs' demand;
    each PoP's signed allowance kept for its next poll, and pushed."""

    def __init__(self, interval_s: float, spend: Any, signer: Any) -> None:
        self.interval_s = interval_s
        self.spend = spend  # (day) -> {(pop, campaign): micros} stored
        self.signer = signer  # () -> the timestamp role's signer
        self.allocator = Allocator(interval_ms=int(interval_s * 1000))
        self.demand = DemandBook()
        self.lock = threading.Lock()
        self.signed: dict[str, bytes] = {}
        self.latest: dict[str, Allowance] = {}
        self.budgets: list[Budget] = []
        self.last_round = 0.0

    def round(self, budgets: list[Budget], now: float | None = None) -> dict[str, bytes]:
        """One allocation; returns each PoP's signed allowance. Blocking (a query, signing):
        run it off the event loop."""
        now = time.time() if now is None else now
        now_ms = int(now * 1000)
        day = now_ms // DAY_MS
        spent = dict(self.spend(day))
        for key, micros in self.demand.reported_spend(day).items():
            if micros > spent.get(key, 0):
                spent[key] = micros
        pops = self.demand.live(now, self.interval_s)
        given = self.allocator.allocate(now_ms, budgets, spent, self.demand.snapshot(), pops)
        signer = self.signer()
        signed = {p: sign(a.document(), signer) for p, a in given.items()}
        with self.lock:
            self.signed = signed
            self.latest = given
            self.budgets = budgets
            self.last_round = now
        return signed

    def allowance(self, pop: str) -> bytes | None:
        with self.lock:
            return self.signed.get(pop)

    def status(self) -> dict[str, Any]:
        """Per budgeted campaign: its day's cap, what the fleet spent as known here, the
        caps given in the last round, and demand and throttling as the PoPs report it."""
        with self.lock:
            latest, budgets = dict(self.latest), list(self.budgets)
        rates = self.demand.snapshot()
        with self.demand.lock:
            throttled = dict(self.demand.throttled)
        out = []
        for b in budgets:
            given = {p: a.caps.get(b.campaign, 0) for p, a in latest.items()}
            spent = sum(a.spent.get(b.campaign, 0) for a in latest.values())
            out.append({
                "campaign": b.campaign, "pacing": b.pacing.value,
                "budget_daily_micros": b.daily_micros, "budget_total_micros": b.total_micros,
                "day_cap_micros": b.day_cap(), "spent_micros": spent,
                "allowed_micros": sum(given.values()), "pops": len(given),
                "eligible_per_s": round(sum(r for (p, c), r in rates.items()
                                            if c == b.campaign), 3),
                "throttled": sum(t for (p, c), t in throttled.items() if c == b.campaign)})
        return {"interval_s": self.interval_s, "last_round": self.last_round, "campaigns": out}


# --- what the origin's service reads -------------------------------------------------------

SPEND_TODAY = (
    "SELECT pop, campaign, sum(price_micros) // 1000 FROM events "
    "WHERE type = 'impression' AND time >= make_timestamp_ms(?) AND time < make_timestamp_ms(?) "
    "GROUP BY 1, 2")
SPEND_BEFORE = (
    "SELECT campaign, sum(price_micros) // 1000 FROM events "
    "WHERE type = 'impression' AND time < make_timestamp_ms(?) GROUP BY 1")


def spend_today(cursor: Any, day: int) -> dict[tuple[str, str], int]:
    """Stored impression spend today by (PoP, campaign), in micros (eCPM / 1000 each)."""
    rows = cursor.execute(SPEND_TODAY, [day * DAY_MS, (day + 1) * DAY_MS]).fetchall()
    return {(str(pop), str(campaign)): int(micros) for pop, campaign, micros in rows}


def spend_before(cursor: Any, day: int) -> dict[str, int]:
    """Stored impression spend before `day` by campaign (for total budgets)."""
    rows = cursor.execute(SPEND_BEFORE, [day * DAY_MS]).fetchall()
    return {str(campaign): int(micros) for campaign, micros in rows}


def budgets_of(campaigns: Iterable[Any], paused: Collection[str],
               before: Mapping[str, int], now_s: float) -> list[Budget]:
    """The budgeted campaigns of the campaign store that can serve now (in flight, not
    paused), as the allocator needs them."""
    out = []
    for c in campaigns:
        if not (c.budget_daily_micros or c.budget_total_micros) or c.id in paused:
            continue
        if not c.start <= now_s < c.end:
            continue
        out.append(Budget(c.id, c.budget_daily_micros, c.budget_total_micros, c.pacing,
                          before.get(c.id, 0)))
    return out
