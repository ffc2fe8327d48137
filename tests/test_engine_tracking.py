"""Tracking URLs, impression dedup, click redirects and the event spool of the real engine."""

from __future__ import annotations

import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.snapshot import synth
from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.model import CampaignSet, parse_documents
from appliance.spool import EventType, read_segment, segments
from tests.engine_harness import RunningEngine, controls_set, running_engine

pytestmark = pytest.mark.integration

REQUEST = {"id": "track-1", "placements": [{"id": "home-side", "count": 2}],
           "geo": {"country": "US"}, "device": {"type": "desktop"}, "time": 1770000000,
           "user": {"key": "user-9"}}


@pytest.fixture(scope="module")
def campaign_set() -> CampaignSet:
    return parse_documents(synth.generate(1500, seed=41))


@pytest.fixture()
def engine(tmp_path: Path, campaign_set: CampaignSet,
           signing_key: SigningKey) -> Iterator[RunningEngine]:
    with running_engine(tmp_path, campaign_set, signing_key,
                        extra=["--spool-segment-age", "1"]) as running:
        yield running


def first_ads(engine: RunningEngine, request: dict[str, Any]) -> list[dict[str, Any]]:
    code, answer = engine.post("/v1/decide", request)
    assert code == 200, answer
    ads: list[dict[str, Any]] = answer["placements"][0]["ads"]
    assert ads, "the sample request should fill"
    return ads


def all_events(folder: Path) -> list[Any]:
    events = []
    for path in segments(folder, closed_only=False):
        segment = read_segment(path)
        assert not segment.torn_tail, path
        events.extend(segment.events)
    return events


def test_impression_counts_once_and_click_redirects(engine: RunningEngine,
                                                    campaign_set: CampaignSet) -> None:
    ads = first_ads(engine, REQUEST)
    ad = ads[0]
    assert ad["imp"].startswith("/v1/e/imp?t=") and ad["click"].startswith("/v1/e/click?t=")
    assert engine.get(ad["imp"]) == (204, b"")
    assert engine.get(ad["imp"]) == (204, b"")  # a retried pixel
    events = engine.status()["events"]
    assert events["impressions"] == 1
    assert events["impressions_duplicate"] == 1
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=5)
    conn.request("GET", ad["click"])
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 302
    creative = {c.id: c for c in campaign_set.creatives}[ad["creative"]]
    assert resp.getheader("Location") == creative.landing_url
    assert engine.status()["events"]["clicks"] == 1


def test_forged_and_misused_tokens_get_403(engine: RunningEngine) -> None:
    ad = first_ads(engine, REQUEST)[0]
    token = urllib.parse.parse_qs(urllib.parse.urlparse(ad["imp"]).query)["t"][0]
    forged = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert engine.get(f"/v1/e/imp?t={forged}")[0] == 403
    assert engine.get("/v1/e/imp?t=")[0] == 403
    assert engine.get("/v1/e/imp?t=!!!")[0] == 403
    # An impression token is no click token.
    assert engine.get(f"/v1/e/click?t={token}")[0] == 403
    errors = engine.status()["errors"]
    assert errors["token_forged"] >= 1
    assert errors["token_malformed"] >= 3


def test_expired_tokens_get_403(tmp_path: Path, campaign_set: CampaignSet,
                                signing_key: SigningKey) -> None:
    with running_engine(tmp_path, campaign_set, signing_key,
                        extra=["--token-ttl", "1"]) as eng:
        ad = first_ads(eng, REQUEST)[0]
        time.sleep(2.2)
        assert eng.get(ad["imp"])[0] == 403
        assert eng.status()["errors"]["token_expired"] == 1


def test_spool_holds_every_answered_request_after_a_crash(engine: RunningEngine) -> None:
    answered = []
    for i in range(200):
        request = dict(REQUEST, id=f"crash-{i}")
        code, _ = engine.post("/v1/decide", request)
        assert code == 200
        answered.append(request["id"])
    ad = first_ads(engine, dict(REQUEST, id="crash-imp"))[0]
    assert engine.get(ad["imp"])[0] == 204
    engine.process.send_signal(signal.SIGKILL)
    engine.process.wait()
    events = all_events(engine.spool)
    decided = {e.fields[0] for e in events if e.type is EventType.DECISION}
    assert set(answered) <= decided, "an answered decision is missing from the spool"
    impressions = [e for e in events if e.type is EventType.IMPRESSION]
    assert [(e.fields[0], e.fields[1]) for e in impressions] == [(ad["campaign"], ad["ad"])]
    record = next(e for e in events if e.type is EventType.DECISION and e.fields[0] == "crash-0")
    assert record.fields[1] == "user-9"
    placement, chosen = record.fields[3]
    assert placement == "home-side" and len(chosen) == 2


def test_segments_rotate_by_age(engine: RunningEngine) -> None:
    assert engine.post("/v1/decide", REQUEST)[0] == 200
    deadline = time.monotonic() + 5
    while not list(engine.spool.glob("*.closed")) and time.monotonic() < deadline:
        time.sleep(0.1)
    closed = list(engine.spool.glob("*.closed"))
    assert closed, "no segment was rotated"
    assert any(e.fields[0] == "track-1" for p in closed for e in read_segment(p).events)
    assert engine.status()["spool"]["segments_closed"] >= 1


@pytest.mark.parametrize("scope", ["campaign", "advertiser"])
def test_frequency_caps_follow_the_echoed_token(tmp_path: Path, signing_key: SigningKey,
                                                scope: str) -> None:
    with running_engine(tmp_path, controls_set(scope), signing_key, shards=1) as eng:
        caps = ""
        served = []
        for i in range(4):
            request = {"id": f"cap-{i}", "placements": [{"id": "slot"}],
                       "user": {"key": "alice"}, "caps": caps, "time": 1770000000 + i}
            code, answer = eng.post("/v1/decide", request)
            assert code == 200, answer
            served.append(answer["placements"][0]["ads"][0]["campaign"])
            caps = answer["caps"]
        assert served[:2] == ["capped", "capped"]
        assert "capped" not in served[2:]
        # The window ends: the cap lets the campaign serve again.
        code, answer = eng.post("/v1/decide", {"id": "cap-late", "placements": [{"id": "slot"}],
                                               "user": {"key": "alice"}, "caps": caps,
                                               "time": 1770000000 + 3601})
        assert answer["placements"][0]["ads"][0]["campaign"] == "capped"
        # Bob cannot reuse Alice's token, and a forged one is ignored: both start afresh.
        for token in (caps, caps[:-2] + ("AA" if caps[-2:] != "AA" else "BB")):
            code, answer = eng.post("/v1/decide", {"id": "bob", "placements": [{"id": "slot"}],
                                                   "user": {"key": "bob"}, "caps": token,
                                                   "time": 1770000000})
            assert answer["placements"][0]["ads"][0]["campaign"] == "capped"
        assert eng.status()["events"]["cap_tokens_rejected"] == 2


def allowance(seq: int, caps: dict[str, int], *, ttl_s: float = 60.0,
              origin_spent: int = 0) -> dict[str, Any]:
    """An allowance set as the supervisor hands it to the engine, valid from now."""
    now_ms = int(time.time() * 1000)
    expires_ms = now_ms + int(ttl_s * 1000)
    return {"seq": seq, "issued_ms": now_ms, "interval_end_ms": min(now_ms + 10_000, expires_ms),
            "expires_ms": expires_ms, "day": now_ms // 86_400_000,
            "campaigns": [{"id": c, "cap_micros": cap, "origin_spent_micros": origin_spent}
                          for c, cap in caps.items()]}


def pacing_of(eng: RunningEngine, campaign: str) -> dict[str, Any]:
    code, body = eng.admin_call("GET", "/pacing")
    assert code == 200, body
    found: dict[str, Any] = next(c for c in body["campaigns"] if c["id"] == campaign)
    return found


def explain_pacing(eng: RunningEngine, campaign: str) -> str | None:
    code, answer = eng.admin_call("POST", "/decide", {
        "id": "why", "placements": [{"id": "slot", "count": 2}], "explain": True})
    assert code == 200, answer
    for loss in answer["placements"][0]["explain"]["lost"]:
        if loss["campaign"] == campaign:
            return str(loss.get("pacing", loss["reason"]))
    return None


def test_budgets_serve_only_inside_an_allowance_charged_at_impressions(
        tmp_path: Path, signing_key: SigningKey) -> None:
    with running_engine(tmp_path, controls_set(), signing_key, shards=2) as eng:
        def second_slots(n: int, tag: str) -> list[dict[str, Any]]:
            ads = []
            for i in range(n):
                # Different users, so the capped campaign takes the first slot each time and
                # the budgeted one (priority 2) competes for the second.
                code, answer = eng.post("/v1/decide", {
                    "id": f"{tag}-{i}", "placements": [{"id": "slot", "count": 2}],
                    "user": {"key": f"{tag}-user-{i}"}})
                assert code == 200, answer
                ads.append(answer["placements"][0]["ads"][1])
            return ads

        # No allowance from the origin: a budgeted campaign never serves, and explain says so.
        assert {a["campaign"] for a in second_slots(3, "none")} == {"house"}
        assert explain_pacing(eng, "budgeted") == "no_allowance"

        # 2.00 allowed; eCPM 1000 reserves 1.00 per chosen ad before its impression.
        code, body = eng.admin_call("POST", "/allowances", allowance(1, {"budgeted": 2_000_000}))
        assert code == 200, body
        time.sleep(0.4)  # every shard picks a new set up on its next tick (100 ms)
        served = [a for a in second_slots(6, "paced") if a["campaign"] == "budgeted"]
        assert len(served) == 2
        assert explain_pacing(eng, "budgeted") == "allowance_spent"
        time.sleep(0.3)
        assert pacing_of(eng, "budgeted")["reserved_micros"] == 2_000_000
        # The impressions turn the reservations into spend, once each.
        for ad in served:
            assert eng.get(ad["imp"]) == (204, b"")
            assert eng.get(ad["imp"]) == (204, b"")
        time.sleep(0.3)
        figures = pacing_of(eng, "budgeted")
        assert (figures["spent_micros"], figures["reserved_micros"]) == (2_000_000, 0)
        assert figures["cap_micros"] == 2_000_000 and figures["pass_rate"] == 0

        # Sequence numbers only go up; a malformed set names its problem; neither replaces
        # the installed one.
        code, body = eng.admin_call("POST", "/allowances", allowance(1, {"budgeted": 9_000_000}))
        assert code == 409 and "not above" in body["message"], body
        broken = allowance(2, {"budgeted": 9_000_000})
        broken["campaigns"][0]["cap_micros"] = -1
        code, body = eng.admin_call("POST", "/allowances", broken)
        assert code == 409 and "cap_micros" in body["message"], body
        assert eng.admin_call("GET", "/pacing")[1]["seq"] == 1

        # A larger cap lets it serve again; the origin's figure of this PoP's spend is a floor
        # an engine that lost its own counters still respects.
        code, body = eng.admin_call("POST", "/allowances",
                                    allowance(2, {"budgeted": 4_000_000}, origin_spent=3_000_000))
        assert code == 200, body
        time.sleep(0.4)
        served = [a for a in second_slots(6, "more") if a["campaign"] == "budgeted"]
        assert len(served) == 1

        # An allowance that expires stops the campaign: losing the origin never overspends.
        code, body = eng.admin_call("POST", "/allowances",
                                    allowance(3, {"budgeted": 90_000_000}, ttl_s=1.0))
        assert code == 200, body
        time.sleep(1.3)
        assert {a["campaign"] for a in second_slots(3, "expired")} == {"house"}
        assert explain_pacing(eng, "budgeted") == "no_allowance"
        assert eng.admin_call("GET", "/pacing")[1]["expired"] is True


def test_an_advertiser_cap_counts_its_uncapped_campaigns(tmp_path: Path,
                                                         signing_key: SigningKey) -> None:
    """`scope = "advertiser"` caps what the user sees of the advertiser: impressions of a
    sibling campaign that carries no cap of its own count too."""
    forever = {"start": 0, "end": 2_000_000_000}
    doc = {
        "advertisers": [{"id": "adv-cap"}, {"id": "adv-house"}],
        "creatives": [
            {"id": f"cr-{n}", "advertiser": adv, "size": size, "url": f"https://{n}.example/",
             "landing_url": f"https://{n}.example/"}
            for n, adv, size in (("cap", "adv-cap", "300x250"), ("sib", "adv-cap", "728x90"),
                                 ("house", "adv-house", "300x250"))],
        "placements": [{"id": "slot", "zone": "z", "sizes": ["300x250"]},
                       {"id": "banner", "zone": "z", "sizes": ["728x90"]}],
        "campaigns": [
            {"id": "capped", "advertiser": "adv-cap", "priority": 1, **forever,
             "ads": [{"id": "ad-cap", "creative": "cr-cap"}],
             "frequency_caps": [{"count": 2, "window": "1h", "scope": "advertiser"}]},
            {"id": "sibling", "advertiser": "adv-cap", "priority": 1, **forever,
             "ads": [{"id": "ad-sib", "creative": "cr-sib"}]},
            {"id": "house", "advertiser": "adv-house", "priority": 16, **forever,
             "ads": [{"id": "ad-house", "creative": "cr-house"}]}],
    }
    with running_engine(tmp_path, parse_documents([("sibling", doc)]), signing_key,
                        shards=1) as eng:
        def serve(placement: str, caps: str, n: int) -> tuple[str, str]:
            code, answer = eng.post("/v1/decide", {
                "id": f"sib-{n}", "placements": [{"id": placement}], "user": {"key": "alice"},
                "caps": caps, "time": 1770000000 + n})
            assert code == 200, answer
            return answer["placements"][0]["ads"][0]["campaign"], answer.get("caps", caps)

        caps = ""
        for n in range(2):
            campaign, caps = serve("banner", caps, n)
            assert campaign == "sibling"
        assert serve("slot", caps, 2)[0] == "house", "two sibling impressions reach the cap"
        assert serve("slot", "", 3)[0] == "capped", "a fresh user still gets it"
        campaign, one = serve("banner", "", 4)
        assert serve("slot", one, 5)[0] == "capped", "one sibling impression is under the cap"


def test_a_total_budget_is_paced_like_a_daily_one(tmp_path: Path,
                                                 signing_key: SigningKey) -> None:
    """A campaign with only `budget_total` serves inside its allowance and no further."""
    doc = {"advertisers": [{"id": "adv"}],
           "creatives": [{"id": "cr", "advertiser": "adv", "size": "300x250",
                          "url": "https://a.example/", "landing_url": "https://a.example/"}],
           "placements": [{"id": "slot", "zone": "z", "sizes": ["300x250"]}],
           "campaigns": [{"id": "total", "advertiser": "adv", "start": 0, "end": 2_000_000_000,
                          "ecpm": 1000.0, "budget_total": 2.0,
                          "ads": [{"id": "ad", "creative": "cr"}]}]}
    with running_engine(tmp_path, parse_documents([("total", doc)]), signing_key,
                        shards=1) as eng:
        def filled() -> int:
            count = 0
            for n in range(4):
                code, answer = eng.post("/v1/decide", {"id": f"t-{n}",
                                                       "placements": [{"id": "slot"}]})
                assert code == 200
                count += len(answer["placements"][0]["ads"])
            return count

        assert filled() == 0
        assert eng.admin_call("POST", "/allowances", allowance(1, {"total": 2_000_000}))[0] == 200
        time.sleep(0.3)
        assert filled() == 2

