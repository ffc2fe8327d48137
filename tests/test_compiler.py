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
)
from appliance.snapshot.model import CampaignSet

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
        strings = list(p.strings)
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
        # Placements sorted by id; candidates fit the sizes and come in priority order.
        placement_ids = [strings[pl.id] for pl in p.placements]
        assert placement_ids == sorted(placement_ids)
        for pl in p.placements:
            sizes = {(s.width, s.height) for s in pl.sizes}
            priorities = []
            for ad_index in pl.candidates:
                ad = p.ads[ad_index]
                cr = p.creatives[ad.creative]
                assert (cr.width, cr.height) in sizes
                priorities.append(p.campaigns[ad.campaign].priority)
            assert priorities == sorted(priorities)
            assert pl.candidates, strings[pl.id]


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
    assert '"contoso-savings"' in text
    assert "maxConjunctionSize = 3" in text
