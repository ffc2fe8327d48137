"""Authoring and validation of the campaign model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.snapshot.model import (
    CampaignError,
    CampaignSet,
    Pacing,
    Request,
    campaign_matches,
    load_campaigns,
    parse_documents,
    parse_hours,
)

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "advertisers": [{"id": "adv-a", "name": "A"}, {"id": "adv-b"}],
    "creatives": [
        {"id": "cr-a", "advertiser": "adv-a", "size": "300x250", "url": "https://c/a.png",
         "landing_url": "https://a.example/"},
        {"id": "cr-b", "advertiser": "adv-b", "size": "728x90", "body": "<b>b</b>",
         "landing_url": "https://b.example/"},
    ],
    "placements": [{"id": "side", "zone": "home", "sizes": ["300x250"]}],
    "campaigns": [{
        "id": "c1", "advertiser": "adv-a", "start": "2026-01-01T00:00:00Z",
        "end": "2027-01-01T00:00:00Z", "priority": 4, "weight": 3, "ecpm": 2.5,
        "budget_total": 100.0, "budget_daily": 10.0, "pacing": "even",
        "frequency_caps": [{"count": 2, "window": "1d", "scope": "advertiser"}],
        "ads": [{"id": "ad1", "creative": "cr-a"}],
        "targeting": [{"country": ["US"], "exclude": {"os": ["ios"]}}],
    }],
}


def parse(doc: dict[str, Any]) -> CampaignSet:
    return parse_documents([("test.json", doc)])


def test_sample_campaigns_load(sample_set: CampaignSet) -> None:
    assert len(sample_set.campaigns) == 4
    northwind = next(c for c in sample_set.campaigns if c.id == "northwind-spring")
    assert northwind.ecpm_micros == 3_200_000
    assert len(northwind.targeting) == 2
    assert northwind.caps[0].window == 86400
    house = next(c for c in sample_set.campaigns if c.id == "house-fallback")
    assert house.targeting == ()


def test_valid_document_parses() -> None:
    result = parse(BASE)
    camp = result.campaigns[0]
    assert camp.pacing is Pacing.EVEN
    assert camp.budget_daily_micros == 10_000_000
    (conj,) = camp.targeting
    assert conj.size == 1
    assert [(p.attribute, p.negated) for p in conj.predicates] == [("country", False),
                                                                  ("os", True)]


def mutate(path: str, value: Any) -> dict[str, Any]:
    """BASE with one field replaced; path like 'campaigns.0.ecpm' (value None deletes)."""
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is None:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("campaigns.0.ecpm", -1, "campaign c1: ecpm:"),
    ("campaigns.0.end", "2025-01-01T00:00:00Z", "campaign c1: end: must be after start"),
    ("campaigns.0.start", "yesterday", "campaign c1: start:"),
    ("campaigns.0.priority", 0, "campaign c1: priority:"),
    ("campaigns.0.pacing", "fast", "campaign c1: pacing: unknown 'fast'"),
    ("campaigns.0.budget_daily", 500.0, "campaign c1: budget_daily: exceeds budget_total"),
    ("campaigns.0.advertiser", "adv-zz", "campaign c1: advertiser: unknown advertiser"),
    ("campaigns.0.ads", [], "campaign c1: ads: needs at least one ad"),
    ("campaigns.0.ads.0.creative", "cr-b", "campaign c1: ads[0].creative: creative 'cr-b' "
                                           "belongs to another advertiser"),
    ("campaigns.0.ads.0.creative", "cr-x", "campaign c1: ads[0].creative: unknown creative"),
    ("campaigns.0.frequency_caps.0.count", 0, "campaign c1: frequency_caps[0].count:"),
    ("campaigns.0.frequency_caps.0.window", "5s", "campaign c1: frequency_caps[0].window:"),
    ("campaigns.0.targeting.0.country", ["usa"], "campaign c1: targeting[0].country: bad value"),
    ("campaigns.0.targeting.0.colour", ["red"], "campaign c1: targeting[0].colour: unknown"),
    ("campaigns.0.targeting.0.device", ["phone"], "campaign c1: targeting[0].device:"),
    ("campaigns.0.targeting.0.hour", [200], "campaign c1: targeting[0].hour:"),
    ("campaigns.0.targeting.0.placement", ["nowhere"],
     "campaign c1: targeting[0].placement: unknown placement"),
    ("campaigns.0.targeting.0.exclude", {"segment": []},
     "campaign c1: targeting[0].exclude.segment: must be a non-empty list"),
    ("creatives.0.size", "big", "creative cr-a: size:"),
    ("creatives.1.url", "https://c/b.png", "creative cr-b: body: give exactly one"),
    ("creatives.0.landing_url", "ftp://x", "creative cr-a: landing_url:"),
    ("placements.0.sizes", [], "placement side: sizes:"),
])
def test_validation_names_campaign_and_field(path: str, value: Any, expected: str) -> None:
    with pytest.raises(CampaignError) as info:
        parse(mutate(path, value))
    assert any(line.startswith(f"test.json: {expected}") for line in info.value.problems), \
        info.value.problems


def test_duplicate_ids_are_reported() -> None:
    doc = copy.deepcopy(BASE)
    doc["campaigns"].append(copy.deepcopy(doc["campaigns"][0]))
    with pytest.raises(CampaignError) as info:
        parse(doc)
    assert "test.json: campaign c1: id: duplicate campaign id (also in test.json); ids must " \
        "be unique" in info.value.problems
    assert "test.json: ad ad1: id: duplicate ad id (also in test.json); ids must be unique" in \
        info.value.problems


def test_all_problems_are_collected() -> None:
    doc = mutate("campaigns.0.ecpm", -1)
    doc["campaigns"][0]["pacing"] = "fast"
    with pytest.raises(CampaignError) as info:
        parse(doc)
    assert len(info.value.problems) == 2


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text("[[campaigns]\n")
    with pytest.raises(CampaignError, match=r"broken\.toml: cannot parse"):
        load_campaigns(tmp_path)
    with pytest.raises(CampaignError, match="not a folder"):
        load_campaigns(tmp_path / "missing")


@pytest.mark.parametrize(("spec", "expected"), [
    ([0, 1, 2], ["0", "1", "2"]),
    # One rule for both forms: both ends are included.
    (["3-5"], ["3", "4", "5"]),
    (["mon 09-11"], ["9", "10", "11"]),
    (["mon-tue 09-09"], ["9", "33"]),
    (["sat-sun 22-23"], ["142", "143", "166", "167"]),
    (["0-167"], [str(h) for h in range(168)]),
    # A reversed range wraps around the week (or the day, or both).
    (["166-1"], ["0", "1", "166", "167"]),
    (["17-9"], [str(h) for h in (*range(0, 10), *range(17, 168))]),
    (["sun 22-01"], ["0", "1", "166", "167"]),
    (["fri-mon 09-10"], ["9", "10", "105", "106", "129", "130", "153", "154"]),
    (["sat-sun 22-24"], None),  # hours of the day are 00-23
    ([168], None),
    (["0-168"], None),
    (["noon"], None),
])
def test_hours(spec: list[Any], expected: list[str] | None) -> None:
    assert parse_hours(spec) == expected


def test_direct_evaluation_semantics() -> None:
    doc = mutate("campaigns.0.targeting", [
        {"country": ["US"], "segment": ["s1", "s2"], "exclude": {"keyword": ["k9"]}},
        {"device": ["ctv"]},
    ])
    (camp,) = parse(doc).campaigns
    assert campaign_matches(camp, Request({"country": ("US",), "segment": ("s2", "s7")}))
    assert not campaign_matches(camp, Request({"country": ("US",), "segment": ("s2",),
                                               "keyword": ("k1", "k9")}))
    assert not campaign_matches(camp, Request({"country": ("GB",), "segment": ("s1",)}))
    assert campaign_matches(camp, Request({"device": ("ctv",), "keyword": ("k9",)}))


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("campaigns.0.prority", 1, "campaign c1: prority: unknown key; did you mean 'priority'?"),
    ("campaigns.0.ads.0.wieght", 2,
     "campaign c1: ads[0].wieght: unknown key; did you mean 'ads[0].weight'?"),
    ("campaigns.0.frequency_caps.0.scpoe", "advertiser",
     "campaign c1: frequency_caps[0].scpoe: unknown key; did you mean "
     "'frequency_caps[0].scope'?"),
    ("campaigns.0.colour", "red", "campaign c1: colour: unknown key; use one of id, "),
    ("creatives.0.landing", "https://x/", "creative cr-a: landing: unknown key; did you mean "
                                          "'landing_url'?"),
    ("placements.0.size", ["300x250"], "placement side: size: unknown key; did you mean "
                                       "'sizes'?"),
    ("advertisers.0.nmae", "A", "advertiser adv-a: nmae: unknown key; did you mean 'name'?"),
    ("campaigns.0.targeting.0.contry", ["US"],
     "campaign c1: targeting[0].contry: unknown attribute; did you mean 'country'?"),
    ("campaigns.0.ads.0.weight", 0, "campaign c1: ads[0].weight: must be a whole number"),
    ("campaigns.0.ads.0.id", "", "campaign c1: ads[0].id: missing or not an id"),
])
def test_unknown_keys_and_ad_fields_are_named(path: str, value: Any, expected: str) -> None:
    with pytest.raises(CampaignError) as info:
        parse(mutate(path, value))
    assert f"test.json: {expected}" in "\n".join(info.value.problems), info.value.problems


def test_every_build_error_names_its_file(tmp_path: Path) -> None:
    """Problems found within a file and across files (a reference, a duplicate) each start
    with the file that holds the faulty entry."""
    doc = copy.deepcopy(BASE)
    campaign = doc.pop("campaigns")[0]
    (tmp_path / "base.json").write_text(json.dumps(doc))
    bad = [dict(campaign, id="c2", advertiser="adv-zz"), dict(campaign, ecpm=-1), campaign]
    (tmp_path / "flights.json").write_text(json.dumps({"campaigns": bad}))
    (tmp_path / "more.toml").write_text('[[campaigns]]\nid = "c1"\nadvertiser = "adv-a"\n'
                                        'start = 2026-01-01\nend = 2027-01-01\n'
                                        'ads = [{ id = "ad9", creative = "cr-a" }]\n')
    with pytest.raises(CampaignError) as info:
        load_campaigns(tmp_path)
    flights, more = tmp_path / "flights.json", tmp_path / "more.toml"
    assert sorted(info.value.problems) == sorted([
        f"{flights}: campaign c1: ecpm: must be a price from 0 to 1000 (currency units per "
        "mille)",
        f"{more}: campaign c1: id: duplicate campaign id (also in {flights}); ids must be "
        "unique",
        f"{flights}: ad ad1: id: duplicate ad id (also in {flights}); ids must be unique",
        f"{flights}: campaign c2: advertiser: unknown advertiser 'adv-zz'",
        f"{flights}: campaign c2: ads[0].creative: creative 'cr-a' belongs to another "
        "advertiser"])
    assert str(info.value).startswith(str(tmp_path)), "the one line names the file too"
