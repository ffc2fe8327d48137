"""The compiled k-index agrees with direct rule evaluation."""

from __future__ import annotations

import random
from typing import Any

import pytest

from appliance.snapshot import synth
from appliance.snapshot.compiler import compile_payload, open_payload, string_table
from appliance.snapshot.index import TargetingIndex
from appliance.snapshot.model import (
    ATTRIBUTES,
    CampaignSet,
    Request,
    campaign_matches,
    parse_documents,
)

pytestmark = pytest.mark.unit


def index_of(campaign_set: CampaignSet) -> tuple[TargetingIndex, list[str]]:
    payload, _ = compile_payload(campaign_set, 1, 0)
    with open_payload(payload) as p:
        index = TargetingIndex.from_payload(p)
        strings = string_table(p)
        ids = [strings[c.id] for c in p.campaigns]
    return index, ids


def values_seen(campaign_set: CampaignSet) -> dict[str, list[str]]:
    seen: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    for camp in campaign_set.campaigns:
        for conj in camp.targeting:
            for p in conj.predicates:
                seen[p.attribute].update(p.values)
    return {a: sorted(v) for a, v in seen.items()}


def random_request(rng: random.Random, seen: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """Mostly values campaigns target (so matches happen), some never-seen ones, some absent
    attributes; several values for the multi-valued attributes."""
    request: dict[str, tuple[str, ...]] = {}
    for attribute, values in seen.items():
        if rng.random() < 0.15 or not values:
            continue
        count = rng.choice((1, 2, 3, 5, 8)) if attribute in ("segment", "keyword") else 1
        picked = {rng.choice(values) if rng.random() < 0.85 else f"unseen-{rng.randrange(9)}"
                  for _ in range(count)}
        request[attribute] = tuple(sorted(picked))
    return request


def test_ten_thousand_random_requests_agree(synthetic_set: CampaignSet) -> None:
    index, ids = index_of(synthetic_set)
    by_id = {c.id: c for c in synthetic_set.campaigns}
    active = [by_id[i] for i in ids]
    seen = values_seen(synthetic_set)
    rng = random.Random(2026)
    matched_total = 0
    multi_value_hits = 0
    for _ in range(10_000):
        request = random_request(rng, seen)
        got = index.matching_campaigns(request)
        want = {i for i, c in enumerate(active) if campaign_matches(c, Request(request))}
        assert got == want, (request, sorted(got ^ want)[:5])
        matched_total += len(want)
        if len(request.get("segment", ())) > 1 or len(request.get("keyword", ())) > 1:
            multi_value_hits += 1
    # The comparison must exercise real matches, multi-valued requests included.
    assert matched_total > 10_000
    assert multi_value_hits > 2_000


def conj_set(targeting: list[dict[str, Any]]) -> CampaignSet:
    doc = {
        "advertisers": [{"id": "a"}],
        "creatives": [{"id": "cr", "advertiser": "a", "size": "1x1", "url": "https://x/",
                       "landing_url": "https://x/"}],
        "placements": [{"id": "p1", "zone": "z", "sizes": ["1x1"]},
                       {"id": "p2", "zone": "z", "sizes": ["1x1"]}],
        "campaigns": [{"id": "c", "advertiser": "a", "start": 0, "end": 10,
                       "ads": [{"id": "ad", "creative": "cr"}], "targeting": targeting}],
    }
    return parse_documents([("t", doc)])


# Edge cases of the algorithm: (targeting of one campaign, request, expected match).
CASES: list[tuple[list[dict[str, Any]], dict[str, tuple[str, ...]], bool]] = [
    ([], {}, True),
    ([], {"country": ("US",)}, True),
    ([{"exclude": {"os": ["ios"]}}], {"os": ("ios",)}, False),
    ([{"exclude": {"os": ["ios"]}}], {"os": ("android",)}, True),
    ([{"exclude": {"os": ["ios"]}}], {}, True),
    ([{"segment": ["s1", "s2"]}], {"segment": ("s1", "s2")}, True),
    ([{"segment": ["s1", "s2"], "country": ["US"]}], {"segment": ("s1", "s2")}, False),
    ([{"segment": ["s1"], "keyword": ["k1"]}], {"segment": ("s1",), "keyword": ("k1", "k2")},
     True),
    ([{"keyword": ["a"], "exclude": {"keyword": ["b"]}}], {"keyword": ("a", "b")}, False),
    ([{"keyword": ["a"], "exclude": {"keyword": ["b"]}}], {"keyword": ("a",)}, True),
    ([{"keyword": ["a"], "exclude": {"keyword": ["a"]}}], {"keyword": ("a",)}, False),
    ([{"country": ["US"], "exclude": {"segment": ["x", "y"]}}],
     {"country": ("US",), "segment": ("a", "y")}, False),
    ([{"country": ["US"]}, {"device": ["ctv"]}], {"device": ("ctv",)}, True),
    ([{"placement": ["p2"]}], {"placement": ("p1",)}, False),
    ([{"hour": ["mon 09-10"]}], {"hour": ("9",)}, True),
    ([{"hour": ["mon 09-10"]}], {"hour": ("10",)}, True),  # both ends included
    ([{"hour": ["mon 09-10"]}], {"hour": ("11",)}, False),
    ([{"hour": ["166-1"]}], {"hour": ("0",)}, True),  # wraps around the week
    ([{"hour": ["166-1"]}], {"hour": ("2",)}, False),
]


@pytest.mark.parametrize(("targeting", "request_values", "expected"), CASES)
def test_edge_cases(targeting: list[dict[str, Any]], request_values: dict[str, tuple[str, ...]],
                    expected: bool) -> None:
    campaign_set = conj_set(targeting)
    index, _ = index_of(campaign_set)
    assert campaign_matches(campaign_set.campaigns[0], Request(request_values)) is expected
    assert (index.matching_campaigns(request_values) == {0}) is expected


def test_shared_conjunctions_are_stored_once() -> None:
    docs = synth.generate(200, seed=5)
    campaigns = docs[2][1]["campaigns"]
    for camp in campaigns:
        camp["targeting"] = [{"country": ["US"], "device": ["mobile"]}]
        camp.pop("paused", None)
    index, ids = index_of(parse_documents(docs))
    assert len(index.conjunction_campaigns) == 1
    assert index.matching_campaigns({"country": ("US",), "device": ("mobile",)}) == set(
        range(len(ids)))
