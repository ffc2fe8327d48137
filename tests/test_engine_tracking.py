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


def test_daily_budget_paces_local_spend(tmp_path: Path, signing_key: SigningKey) -> None:
    with running_engine(tmp_path, controls_set(), signing_key, shards=1) as eng:
        served = []
        for i in range(5):
            # Different users, so the capped campaign serves each once and then the budgeted
            # campaign (priority 2) wins the second slot until its $2 day budget is spent.
            request = {"id": f"pace-{i}", "placements": [{"id": "slot", "count": 2}],
                       "user": {"key": f"user-{i}"}, "time": 1770000000}
            code, answer = eng.post("/v1/decide", request)
            assert code == 200
            served.append([a["campaign"] for a in answer["placements"][0]["ads"]])
        # eCPM 1000 spends 1.00 per ad: two ads exhaust the 2.00 daily budget.
        assert [s[1] for s in served] == ["budgeted", "budgeted", "house", "house", "house"]
        # The next UTC day the budget starts over.
        code, answer = eng.post("/v1/decide", {"id": "tomorrow",
                                               "placements": [{"id": "slot", "count": 2}],
                                               "user": {"key": "user-x"},
                                               "time": 1770000000 + 86400})
        assert [a["campaign"] for a in answer["placements"][0]["ads"]] == ["capped", "budgeted"]


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


def test_budget_total_is_not_enforced_as_the_readme_says(tmp_path: Path,
                                                        signing_key: SigningKey) -> None:
    """The README's budget paragraph, pinned: a total budget of 2.00 with no daily budget
    does not stop a campaign that spends 1.00 per ad (the fleet budgets issue changes both)."""
    doc = {"advertisers": [{"id": "adv"}],
           "creatives": [{"id": "cr", "advertiser": "adv", "size": "300x250",
                          "url": "https://a.example/", "landing_url": "https://a.example/"}],
           "placements": [{"id": "slot", "zone": "z", "sizes": ["300x250"]}],
           "campaigns": [{"id": "total", "advertiser": "adv", "start": 0, "end": 2_000_000_000,
                          "ecpm": 1000.0, "budget_total": 2.0,
                          "ads": [{"id": "ad", "creative": "cr"}]}]}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "`budget_total` is checked when the campaign is built" in readme
    with running_engine(tmp_path, parse_documents([("total", doc)]), signing_key,
                        shards=1) as eng:
        for n in range(4):
            code, answer = eng.post("/v1/decide", {"id": f"t-{n}", "placements": [{"id": "slot"}],
                                                   "time": 1770000000})
            assert code == 200 and answer["placements"][0]["ads"][0]["campaign"] == "total"
