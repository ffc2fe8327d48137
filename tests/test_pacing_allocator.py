"""The origin's fleet allocator and the PoP's check of a signed allowance."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from appliance.origin.pacing import (
    DAY_MS,
    Allocator,
    Budget,
    DemandBook,
    curve,
    sign,
)
from appliance.origin.tuf_repo import Repository
from appliance.snapshot.model import Pacing
from appliance.sync.allowances import AllowanceError, verify

pytestmark = pytest.mark.unit

DAY = 20_000
NOON = DAY * DAY_MS + DAY_MS // 2


def test_curves_start_at_zero_and_end_at_the_whole_budget() -> None:
    for pacing in (Pacing.EVEN, Pacing.FRONTLOADED):
        assert curve(pacing, 0.0) == 0.0 and curve(pacing, 1.0) == 1.0
        assert curve(pacing, 0.5) <= curve(pacing, 0.6)
    assert curve(Pacing.EVEN, 0.5) == 0.5
    assert curve(Pacing.FRONTLOADED, 0.5) > 0.5
    assert curve(Pacing.ASAP, 0.01) == 1.0


def test_a_total_budget_caps_the_day() -> None:
    assert Budget("c", 5_000, 0, Pacing.EVEN).day_cap() == 5_000
    assert Budget("c", 5_000, 12_000, Pacing.EVEN, spent_before_today=9_000).day_cap() == 3_000
    assert Budget("c", 0, 12_000, Pacing.EVEN, spent_before_today=13_000).day_cap() == 0


def test_the_increment_follows_the_curve_and_is_shared_by_demand() -> None:
    alloc = Allocator(interval_ms=10_000)
    budget = Budget("c", 86_400_000, 0, Pacing.EVEN)  # 1,000 micros a second
    # At noon with half the budget spent, the next interval's increment is 10 s of budget.
    spent = {("a", "c"): 30_000_000, ("b", "c"): 13_200_000}
    out = alloc.allocate(NOON, [budget], spent, {("a", "c"): 3.0, ("b", "c"): 1.0}, ["a", "b"])
    inc_a = out["a"].caps["c"] - 30_000_000
    inc_b = out["b"].caps["c"] - 13_200_000
    assert inc_a + inc_b == pytest.approx(10_000, abs=2)
    assert inc_a == pytest.approx(3 * inc_b, abs=2)
    assert out["a"].spent["c"] == 30_000_000
    assert out["a"].expires_ms == NOON + 30_000 and out["a"].interval_end_ms == NOON + 10_000


def test_caps_a_pop_may_still_hold_are_never_given_twice() -> None:
    """Random rounds, PoPs falling silent and coming back, spend arriving late: the sum over
    PoPs of the largest unexpired cap each was given (or the newest, while it is silent)
    never passes the day's cap."""
    rng = random.Random(4)
    alloc = Allocator(interval_ms=10_000)
    budget = Budget("c", 1_000_000, 0, Pacing.ASAP)
    pops = [f"p{i}" for i in range(6)]
    spent = {p: 0 for p in pops}
    given: dict[str, list[tuple[int, int, int]]] = {p: [] for p in pops}  # (at, cap, expires)
    for r in range(300):
        now = NOON + r * 10_000
        live = [p for p in pops if rng.random() > 0.2]
        out = alloc.allocate(now, [budget], {(p, "c"): spent[p] for p in pops},
                             {(p, "c"): rng.random() for p in pops}, live)
        for p, a in out.items():
            given[p].append((now, a.caps["c"], a.expires_ms))
            # The PoP spends some of what it was given; the origin learns of it later.
            spent[p] = max(spent[p], a.caps["c"] - rng.randint(0, 3_000))
        holding = 0
        for p in pops:
            caps = [cap for _, cap, exp in given[p] if exp > now]
            holding += max(caps + [spent[p]] + ([given[p][-1][1]] if given[p] and p not in live
                                                 else []))
        assert holding <= budget.day_cap(), r
    assert sum(spent.values()) > 0.95 * budget.day_cap(), "the budget is spent nearly whole"


def test_sequence_numbers_only_go_up_and_a_new_day_starts_over() -> None:
    alloc = Allocator(interval_ms=10_000)
    budget = Budget("c", 1_000_000, 0, Pacing.ASAP)
    first = alloc.allocate(NOON, [budget], {}, {}, ["a"])["a"]
    again = alloc.allocate(NOON, [budget], {}, {}, ["a"])["a"]  # a clock that did not move
    assert again.seq > first.seq
    assert first.caps["c"] == 1_000_000
    # Spent in full yesterday; today starts over.
    tomorrow = alloc.allocate(NOON + DAY_MS, [budget], {}, {}, ["a"])["a"]
    assert tomorrow.day == DAY + 1 and tomorrow.caps["c"] == 1_000_000


def test_demand_is_a_rate_between_reports() -> None:
    book = DemandBook()
    book.report("a", DAY, {"c": (100, 5)}, 1000.0, {"c": 700})
    book.report("a", DAY, {"c": (300, 9)}, 1010.0, {"c": 900})
    assert book.snapshot()[("a", "c")] == pytest.approx(20.0)
    assert book.reported_spend(DAY) == {("a", "c"): 900}
    assert book.live(1020.0, 10.0) == ["a"] and book.live(1100.0, 10.0) == []


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return Repository.open(tmp_path_factory.mktemp("tuf"), 1, 1)


def signed_allowance(repo: Repository, **changes: object) -> bytes:
    doc = {"type": "adpop-allowance", "pop": "pop-1", "seq": 7, "issued_ms": 1,
           "interval_end_ms": 2, "expires_ms": 10**13, "day": DAY,
           "campaigns": [{"id": "c", "cap_micros": 5, "origin_spent_micros": 0}]}
    doc.update(changes)
    return sign(doc, repo.online_signer())


def test_a_pop_believes_only_what_the_timestamp_key_signed_for_it(repo: Repository) -> None:
    root = repo.root_bytes()
    good = signed_allowance(repo)
    believed = verify(good, root, "pop-1", 0)
    assert believed.seq == 7 and believed.signed["campaigns"][0]["cap_micros"] == 5

    def refused(raw: bytes, why: str, pop: str = "pop-1", newer_than: int = 0) -> None:
        with pytest.raises(AllowanceError, match=why):
            verify(raw, root, pop, newer_than)

    refused(good, "not this PoP", pop="pop-2")
    refused(good, "not newer", newer_than=7)
    refused(signed_allowance(repo, expires_ms=5), "expired")
    refused(b"{", "malformed")
    tampered = json.loads(good)
    tampered["signed"]["campaigns"][0]["cap_micros"] = 5_000_000
    refused(json.dumps(tampered).encode(), "signed by 0 of the 1")
    # A key the root does not name for the timestamp role (here: a targets key) counts nothing.
    other = repo._signer_for(repo.root(), "targets")
    refused(sign(json.loads(good)["signed"], other), "signed by 0 of the 1")


def test_an_oversized_allowance_is_refused_before_it_is_parsed(repo: Repository,
                                                               tmp_path: Path) -> None:
    with pytest.raises(AllowanceError, match="limit"):
        verify(b" " * (9 * 1024**2), repo.root_bytes(), "pop-1", 0)


def test_the_budget_lines_say_what_an_operator_needs() -> None:
    from appliance.supervisor.client import pacing_view

    now = 1_000_000.0
    level, line, rows = pacing_view({}, now)
    assert level == "warn" and "no allowance" in line and rows == []
    pacing = {"seq": 12, "expires_ms": (now + 25) * 1000, "expired": False, "problem": "",
              "cache": {"address": "127.0.0.1:6379", "shards_up": 2, "degraded_decisions": 3},
              "campaigns": [{"id": "c", "cap_micros": 2_000_000, "spent_micros": 1_500_000,
                             "reserved_micros": 250_000, "pass_rate": 0.25, "eligible": 40,
                             "throttled": 30}]}
    level, line, rows = pacing_view(pacing, now)
    assert level == "ok" and "allowance 12" in line and "good for 25 s" in line
    assert "2 shards linked, 3 decisions without it" in line
    assert rows == ["c: spent 1.50 of 2.00 allowed, reserved 0.25, pass 25%, 30/40 held"]
    level, line, _ = pacing_view({**pacing, "expired": True, "problem": "origin unreachable"},
                                 now)
    assert level == "bad" and "EXPIRED" in line and "origin unreachable" in line
