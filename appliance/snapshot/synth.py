"""Realistic synthetic campaign sets for tests and benchmarks, reproducible from a seed.

Shape, after what ad servers see: most campaigns target a few countries (Zipf-skewed toward
the big markets) and device types; a share add OS, regions, site domains, user segments,
keywords, dayparts, placements and exclusions; some have two conjunctions; a few are
untargeted house campaigns. Several placements with IAB sizes; advertisers reuse creatives.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

COUNTRIES = ("US", "GB", "DE", "FR", "JP", "CA", "BR", "IN", "AU", "IT", "ES", "MX", "NL",
             "SE", "KR", "PL", "TR", "AR", "BE", "CH", "AT", "NO", "DK", "FI", "IE", "PT",
             "NZ", "SG", "ZA", "CL")
DEVICES = ("desktop", "mobile", "tablet", "ctv")
OSES = ("android", "ios", "windows", "macos", "linux", "tvos", "tizen")
SIZES = ("300x250", "728x90", "320x50", "160x600", "300x600", "970x250", "336x280", "320x100")
PLACEMENTS = (
    ("home-top", "homepage", ("728x90", "970x250")),
    ("home-side", "homepage", ("300x250", "300x600", "160x600")),
    ("article-inline", "article", ("300x250", "336x280")),
    ("article-bottom", "article", ("728x90", "320x100")),
    ("mobile-banner", "app", ("320x50", "320x100")),
    ("mobile-interstitial", "app", ("300x250", "320x480")),
    ("video-companion", "video", ("300x250", "300x600")),
    ("search-results", "search", ("728x90", "300x250")),
)
YEAR_START = 1767225600  # 2026-01-01T00:00:00Z
YEAR = 365 * 86400


def _zipf_pick(rng: random.Random, items: tuple[str, ...], k: int) -> list[str]:
    weights = [1.0 / (i + 1) for i in range(len(items))]
    picked: set[str] = set()
    while len(picked) < k:
        picked.add(rng.choices(items, weights)[0])
    return sorted(picked)


def generate(campaigns: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """The synthetic set as authoring documents: [(file name, document)]."""
    rng = random.Random(seed)
    n_adv = max(1, campaigns // 20)
    regions = [f"{c}-{r:02d}" for c in COUNTRIES[:10] for r in range(1, 21)]
    domains = [f"site{i}.example" for i in range(2000)]
    segments = [f"seg-{i}" for i in range(500)]
    keywords = [f"kw{i}" for i in range(3000)]
    placement_ids = [p[0] for p in PLACEMENTS]

    advertisers: list[dict[str, Any]] = []
    creatives: list[dict[str, Any]] = []
    creatives_of: list[list[str]] = []
    for a in range(n_adv):
        aid = f"adv-{a:06d}"
        advertisers.append({"id": aid, "name": f"Advertiser {a}"})
        own: list[str] = []
        for c in range(rng.randint(3, 6)):
            cid = f"cr-{a:06d}-{c}"
            size = rng.choice(SIZES)
            creative: dict[str, Any] = {
                "id": cid, "advertiser": aid, "size": size,
                "landing_url": f"https://adv{a}.example/landing/{c}",
            }
            if rng.random() < 0.3:
                creative["type"] = "html"
                creative["body"] = f"<div class=ad data-a={a} data-c={c}>Offer {a}-{c}</div>"
            else:
                creative["type"] = "image"
                creative["url"] = f"https://cdn.adv{a}.example/{c}/{size}.png"
            creatives.append(creative)
            own.append(cid)
        creatives_of.append(own)

    documents: list[tuple[str, dict[str, Any]]] = [
        ("advertisers.json", {"advertisers": advertisers, "creatives": creatives}),
        ("placements.json", {"placements": [
            {"id": pid, "zone": zone, "sizes": list(sizes)} for pid, zone, sizes in PLACEMENTS
        ]}),
    ]
    chunk: list[dict[str, Any]] = []
    for i in range(campaigns):
        a = rng.randrange(n_adv)
        start = YEAR_START + rng.randrange(0, YEAR // 2)
        camp: dict[str, Any] = {
            "id": f"camp-{i:07d}",
            "advertiser": f"adv-{a:06d}",
            "name": f"Campaign {i}",
            "start": start,
            "end": start + rng.randrange(7, 180) * 86400,
            "priority": rng.choices((2, 4, 6, 8, 12, 16), (2, 5, 30, 50, 8, 5))[0],
            "weight": rng.randint(1, 100),
            "ecpm": round(rng.lognormvariate(0.5, 0.8), 2),
            "pacing": rng.choices(("even", "asap", "frontloaded"), (70, 20, 10))[0],
            "ads": [{"id": f"ad-{i:07d}-{j}", "creative": cr, "weight": rng.randint(1, 10)}
                    for j, cr in enumerate(_pick_creatives(rng, creatives_of[a]))],
        }
        if rng.random() < 0.6:
            camp["budget_total"] = float(rng.randrange(1000, 100000))
            camp["budget_daily"] = round(camp["budget_total"] / rng.randint(10, 60), 2)
        if rng.random() < 0.15:
            camp["frequency_caps"] = [{"count": rng.randint(1, 5),
                                       "window": rng.choice(("1h", "1d", "7d")),
                                       "scope": rng.choice(("campaign", "advertiser"))}]
        if rng.random() < 0.1:
            camp["exclusion_labels"] = [rng.choice(("auto", "airline", "bank", "telco"))]
        if rng.random() < 0.01:
            camp["paused"] = True
        if rng.random() >= 0.03:  # 3% untargeted house campaigns
            conjunctions = 2 if rng.random() < 0.1 else 1
            camp["targeting"] = [_conjunction(rng, regions, domains, segments, keywords,
                                              placement_ids) for _ in range(conjunctions)]
        chunk.append(camp)
        if len(chunk) == 10_000:
            documents.append((f"campaigns-{i // 10_000:05d}.json", {"campaigns": chunk}))
            chunk = []
    if chunk:
        documents.append((f"campaigns-{campaigns // 10_000:05d}.json", {"campaigns": chunk}))
    return documents


def _pick_creatives(rng: random.Random, own: list[str]) -> list[str]:
    return rng.sample(own, rng.randint(1, min(3, len(own))))


def _conjunction(rng: random.Random, regions: list[str], domains: list[str],
                 segments: list[str], keywords: list[str], placements: list[str]
                 ) -> dict[str, Any]:
    conj: dict[str, Any] = {}
    exclude: dict[str, Any] = {}
    if rng.random() < 0.9:
        conj["country"] = _zipf_pick(rng, COUNTRIES, rng.choice((1, 1, 2, 3, 5)))
    if rng.random() < 0.7:
        conj["device"] = sorted(rng.sample(DEVICES, rng.choice((1, 1, 2))))
    if rng.random() < 0.2:
        conj["os"] = sorted(rng.sample(OSES, rng.randint(1, 2)))
    elif rng.random() < 0.1:
        exclude["os"] = [rng.choice(OSES)]
    if rng.random() < 0.1:
        conj["region"] = sorted(rng.sample(regions, rng.randint(1, 4)))
    if rng.random() < 0.15:
        conj["domain"] = sorted(rng.sample(domains, rng.randint(1, 10)))
    elif rng.random() < 0.1:
        exclude["domain"] = sorted(rng.sample(domains, rng.randint(1, 5)))
    if rng.random() < 0.2:
        conj["segment"] = sorted(rng.sample(segments, rng.randint(1, 6)))
    if rng.random() < 0.1:
        conj["keyword"] = sorted(rng.sample(keywords, rng.randint(1, 8)))
    elif rng.random() < 0.05:
        exclude["keyword"] = sorted(rng.sample(keywords, rng.randint(1, 3)))
    if rng.random() < 0.1:
        conj["hour"] = [rng.choice(("mon-fri 07-10", "mon-fri 17-23", "sat-sun 08-22", "0-47"))]
    if rng.random() < 0.1:
        conj["placement"] = sorted(rng.sample(placements, rng.randint(1, 3)))
    if exclude:
        conj["exclude"] = exclude
    return conj


def write(documents: list[tuple[str, dict[str, Any]]], out: Path) -> list[Path]:
    """Write the documents as JSON files into `out` (created); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, doc in documents:
        path = out / name
        path.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
        paths.append(path)
    return paths
