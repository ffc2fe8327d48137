"""The compiler: deterministic payloads holding everything the engine needs, readable by C++."""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
from pathlib import Path
from typing import TypeVar

import pytest

from appliance.snapshot.compiler import (
    SCHEMA_PATH,
    PayloadError,
    compile_payload,
    open_payload,
    schema_id,
    string_table,
)
from appliance.snapshot.model import CampaignSet, parse_documents

pytestmark = pytest.mark.unit

T = TypeVar("T")


def shuffled(campaign_set: CampaignSet, seed: int) -> CampaignSet:
    """The same campaigns with every authored order changed."""
    rng = random.Random(seed)

    def mix(items: tuple[T, ...]) -> tuple[T, ...]:
        out = list(items)
        rng.shuffle(out)
        return tuple(out)

    campaigns = tuple(
        dataclasses.replace(c, ads=mix(c.ads), targeting=mix(c.targeting))
        for c in mix(campaign_set.campaigns)
    )
    return CampaignSet(mix(campaign_set.advertisers), mix(campaign_set.creatives),
                       mix(campaign_set.placements), campaigns)


def test_same_campaigns_give_identical_bytes(synthetic_set: CampaignSet) -> None:
    first, _ = compile_payload(synthetic_set, 7, 1_700_000_000)
    again, _ = compile_payload(synthetic_set, 7, 1_700_000_000)
    reordered, _ = compile_payload(shuffled(synthetic_set, 3), 7, 1_700_000_000)
    assert first == again
    assert first == reordered


def test_payload_holds_the_campaigns(sample_set: CampaignSet) -> None:
    payload, stats = compile_payload(sample_set, 2, 1_800_000_000)
    assert stats.campaigns == 4
    with open_payload(payload) as p:
        strings = string_table(p)
        assert strings[0] == ""
        assert p.version == 2
        assert p.schemaId == int(schema_id(), 16)
        assert p.createdAt == 1_800_000_000
        camps = {strings[c.id]: c for c in p.campaigns}
        contoso = camps["contoso-savings"]
        assert contoso.ecpmMicros == 6_500_000
        assert contoso.priority == 4
        assert str(contoso.pacing) == "frontloaded"
        assert [(cap.count, cap.windowSeconds, str(cap.scope)) for cap in contoso.caps] == [
            (1, 3600, "campaign"), (5, 86400, "advertiser")]
        assert [strings[s] for s in contoso.exclusionLabels] == ["finance"]
        assert strings[p.advertisers[contoso.advertiser].name] == "Contoso Bank"
        ads = [p.ads[i] for i in range(contoso.adsStart, contoso.adsStart + contoso.adsCount)]
        assert sorted(strings[a.id] for a in ads) == ["ad-contoso-mobile", "ad-contoso-mrec"]
        creative = p.creatives[ads[0].creative]
        assert strings[creative.landingUrl] == "https://contoso.example/savings"
        # Placements sorted by id; their tier lists hold campaigns with an ad that fits, in
        # tiers of their own priority, best first, with running weight sums.
        placement_ids = [strings[pl.id] for pl in p.placements]
        assert placement_ids == sorted(placement_ids)
        for pl in p.placements:
            sizes = {(s.width, s.height) for s in pl.sizes}
            seen = set()
            for part in pl.partitions:
                priorities = [t.priority for t in part.tiers]
                assert priorities == sorted(set(priorities))
                for tier in part.tiers:
                    running = 0
                    for ci, cumulative in zip(tier.campaigns, tier.cumulativeWeights, strict=True):
                        camp = p.campaigns[ci]
                        assert camp.priority == tier.priority
                        running += camp.weight
                        assert cumulative == running
                        ads = [p.ads[a] for a in range(camp.adsStart,
                                                        camp.adsStart + camp.adsCount)]
                        assert any((a.width, a.height) in sizes for a in ads)
                        seen.add(ci)
            assert seen, strings[pl.id]



def test_paused_campaigns_are_left_out(sample_set: CampaignSet) -> None:
    paused = dataclasses.replace(sample_set.campaigns[0], paused=True)
    campaign_set = dataclasses.replace(sample_set, campaigns=(paused, *sample_set.campaigns[1:]))
    payload, stats = compile_payload(campaign_set, 1, 0)
    assert stats.paused_skipped == 1
    with open_payload(payload) as p:
        assert len(p.campaigns) == 3
        assert p.stats.pausedSkipped == 1


def test_garbage_is_a_payload_error() -> None:
    with pytest.raises(PayloadError), open_payload(b"\xff" * 64) as p:
        _ = p.version + len(p.campaigns)


capnp_tool = pytest.mark.skipif(shutil.which("capnp") is None,
                                reason="capnp compiler missing: `make setup` installs capnproto")


@capnp_tool
def test_schema_compiles_to_cpp(tmp_path: Path) -> None:
    """The engine compiles this same schema file; the C++ generator must accept it."""
    subprocess.run(["capnp", "compile", f"-oc++:{tmp_path}", f"--src-prefix={SCHEMA_PATH.parent}",
                    str(SCHEMA_PATH)], check=True)
    header = (tmp_path / "snapshot.capnp.h").read_text()
    assert "struct Payload" in header
    assert f"CAPNP_DECLARE_SCHEMA({schema_id()[2:]}" not in header  # file id is not a struct
    assert schema_id() == "0xa1387dd9f2dc5b7d"


@capnp_tool
def test_cpp_reader_decodes_our_payload(sample_set: CampaignSet, tmp_path: Path) -> None:
    """The official C++ reader (capnp decode) reads what pycapnp wrote."""
    payload, _ = compile_payload(sample_set, 9, 1_800_000_000)
    result = subprocess.run(["capnp", "decode", str(SCHEMA_PATH), "Payload"], input=payload,
                            capture_output=True, check=True)
    text = result.stdout.decode()
    assert "version = 9" in text
    assert "contoso-savings" in text  # inside stringBlob
    assert "stringOffsets = [0, 0, " in text  # string 0 is the empty string
    assert "maxConjunctionSize = 3" in text


def test_partitions_place_each_campaign_once_per_country_split() -> None:
    """Placement targeting and size decide where a campaign is listed; a country IN lists it
    under that country, no country IN under partition 0 (any country)."""
    doc = {
        "advertisers": [{"id": "a"}],
        "creatives": [{"id": "cr", "advertiser": "a", "size": "300x250", "url": "https://x/",
                       "landing_url": "https://x/"}],
        "placements": [{"id": "p1", "zone": "z", "sizes": ["300x250"]},
                       {"id": "p2", "zone": "z", "sizes": ["300x250"]},
                       {"id": "p3", "zone": "z", "sizes": ["728x90"]}],
        "campaigns": [
            {"id": "only-p1", "advertiser": "a", "start": 0, "end": 10,
             "ads": [{"id": "ad1", "creative": "cr"}], "targeting": [{"placement": ["p1"]}]},
            {"id": "us-gb", "advertiser": "a", "start": 0, "end": 10,
             "ads": [{"id": "ad2", "creative": "cr"}],
             "targeting": [{"country": ["US", "GB"]}]},
            {"id": "anywhere", "advertiser": "a", "start": 0, "end": 10,
             "ads": [{"id": "ad3", "creative": "cr"}],
             "targeting": [{"country": ["US"]}, {"device": ["ctv"]}]},
        ],
    }
    campaign_set = parse_documents([("t", doc)])
    payload, _ = compile_payload(campaign_set, 1, 0)
    with open_payload(payload) as p:
        strings = string_table(p)
        countries = list(p.index.attributes[0].values)
        listing: dict[tuple[str, str], set[str]] = {}
        for pl in p.placements:
            for k, part in enumerate(pl.partitions):
                name = "any" if k == 0 else countries[k - 1]
                for tier in part.tiers:
                    for ci in tier.campaigns:
                        listing.setdefault((strings[pl.id], name), set()).add(
                            strings[p.campaigns[ci].id])
    assert listing == {
        ("p1", "any"): {"only-p1", "anywhere"},
        ("p2", "any"): {"anywhere"},
        ("p1", "GB"): {"us-gb"}, ("p1", "US"): {"us-gb"},
        ("p2", "GB"): {"us-gb"}, ("p2", "US"): {"us-gb"},
    }
