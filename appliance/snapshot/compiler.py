"""Compile a validated campaign set into the Cap'n Proto payload the engine reads in place.

Deterministic: tables are sorted by id and ids assigned in that order, so the same campaigns
always give a byte-identical payload whatever order the files listed them in.
"""

from __future__ import annotations

import functools
import itertools
import logging
import mmap
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import capnp

from appliance.config import SnapshotSettings
from appliance.errors import AdpopError
from appliance.snapshot.model import (
    ATTRIBUTES,
    Campaign,
    CampaignSet,
    CapScope,
    Conjunction,
    Pacing,
    bulk_allocation,
)

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).with_name("snapshot.capnp")
PASS_THROUGH_ALL = 1_000_000  # ppm: no forecast-based throttling until the origin sets one


class PayloadError(AdpopError):
    """A payload could not be read as a snapshot (corrupt, or over a traversal limit)."""


@functools.lru_cache(maxsize=1)
def schema() -> Any:
    """The loaded schema module (pycapnp); loaded once."""
    return capnp.load(str(SCHEMA_PATH))


def schema_id() -> str:
    """The schema's file id as the manifest writes it ("0x" + 16 hex digits)."""
    return f"0x{schema().Payload.schema.node.scopeId:016x}"


@dataclass(frozen=True)
class CompileStats:
    campaigns: int
    paused_skipped: int
    ads: int
    conjunctions: int
    posting_lists: int
    posting_entries: int
    max_conjunction_size: int
    strings: int


def id_hash(text: str) -> int:
    """CRC-32 (zlib's) of the id: the engine's key for caps and spend, and its value hash.
    zlib computes it in C, which keeps a million-campaign compile fast."""
    return zlib.crc32(text.encode())


def hash_slots(encoded: Sequence[bytes]) -> list[int]:
    """The open-addressing table of AttributeValues.slots (ordinal + 1 per used slot)."""
    size = 2
    while size < 2 * len(encoded):
        size *= 2
    slots = [0] * size
    mask = size - 1
    for ordinal, value in enumerate(encoded):
        at = zlib.crc32(value) & mask
        while slots[at]:
            at = (at + 1) & mask
        slots[at] = ordinal + 1
    return slots


def pack(encoded: Sequence[bytes]) -> tuple[bytes, list[int]]:
    """Byte strings as one blob and offsets: item i is blob[offsets[i]:offsets[i + 1]]."""
    return b"".join(encoded), [0, *itertools.accumulate(map(len, encoded))]


def pack_strings(strings: Sequence[str]) -> tuple[bytes, list[int]]:
    return pack([text.encode() for text in strings])


def string_table(payload: Any) -> list[str]:
    """The interned strings of a payload reader, by StringId."""
    blob: bytes = payload.stringBlob
    offsets = list(payload.stringOffsets)
    return [blob[a:b].decode() for a, b in itertools.pairwise(offsets)]


class _Steps:
    """Logs each compile step's name and duration (at debug level)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        log.debug("compile step %s: %.2fs", name, now - self.last)
        self.last = now


class _Interner:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {"": 0}
        self.strings: list[str] = [""]

    def __call__(self, text: str) -> int:
        sid = self.ids.get(text)
        if sid is None:
            sid = self.ids[text] = len(self.strings)
            self.strings.append(text)
        return sid


_EMPTY = Conjunction(())
_ATTRIBUTE_NUMBER = {name: i for i, name in enumerate(ATTRIBUTES)}


def compile_payload(campaign_set: CampaignSet, version: int, created_at: int
                    ) -> tuple[bytes, CompileStats]:
    """The payload bytes for `campaign_set` and what went into them.

    The set must already be validated (model.parse_documents): references are trusted here.
    """
    with bulk_allocation():
        return _compile(campaign_set, version, created_at)


def _compile(campaign_set: CampaignSet, version: int, created_at: int
             ) -> tuple[bytes, CompileStats]:
    s = schema()
    intern = _Interner()
    # One segment from the start (see _single_segment): a generous first segment costs only
    # address space, as pages nobody writes are never touched.
    estimate = (1 << 20) + 160 * len(campaign_set.campaigns) + 64 * len(campaign_set.creatives)
    msg = s.Payload.new_message(num_first_segment_words=estimate)
    msg.version = version
    msg.createdAt = created_at
    msg.schemaId = s.Payload.schema.node.scopeId

    active = sorted((c for c in campaign_set.campaigns if not c.paused), key=lambda c: c.id)
    paused = len(campaign_set.campaigns) - len(active)

    advertisers = sorted(campaign_set.advertisers, key=lambda a: a.id)
    advertiser_index = {a.id: i for i, a in enumerate(advertisers)}
    windows: dict[str, set[int]] = {}
    for campaign in active:
        for cap in campaign.caps:
            if cap.scope is CapScope.ADVERTISER:
                windows.setdefault(campaign.advertiser, set()).add(cap.window)
    out_adv = msg.init("advertisers", len(advertisers))
    for i, adv in enumerate(advertisers):
        out_adv[i].id = intern(adv.id)
        out_adv[i].name = intern(adv.name)
        out_adv[i].idHash = id_hash(adv.id)
        if adv.id in windows:
            out_adv[i].capWindows = sorted(windows[adv.id])

    creatives = sorted(campaign_set.creatives, key=lambda c: c.id)
    creative_index = {c.id: i for i, c in enumerate(creatives)}
    out_cre = msg.init("creatives", len(creatives))
    for i, cre in enumerate(creatives):
        o = out_cre[i]
        o.id = intern(cre.id)
        o.advertiser = advertiser_index[cre.advertiser]
        o.kind = cre.kind.value
        o.width = cre.size.width
        o.height = cre.size.height
        o.body = intern(cre.body)
        o.url = intern(cre.url)
        o.landingUrl = intern(cre.landing_url)

    step = _Steps()
    conj_table = _Conjunctions(active)
    msg.campaignStarts = [c.start for c in active]
    msg.campaignEnds = [c.end for c in active]
    step("conjunctions")
    ad_count = _write_campaigns(msg, active, advertiser_index, creative_index, intern,
                                conj_table, [c.size for c in creatives])
    step("campaigns and ads")
    _write_placements(msg, campaign_set, active, creatives, creative_index, intern,
                      conj_table)
    step("placement tiers")
    index_stats = _write_index(msg, conj_table)
    step("k-index")

    # Strings last: everything above interned into the table.
    msg.stringBlob, msg.stringOffsets = pack_strings(intern.strings)
    step("strings")

    conjunctions, lists, entries, max_k = index_stats
    st = msg.stats
    st.campaigns = len(active)
    st.pausedSkipped = paused
    st.conjunctions = conjunctions
    st.postingLists = lists
    st.postingEntries = entries
    st.maxConjunctionSize = max_k
    st.maxEcpmMicros = max((c.ecpm_micros for c in active), default=0)
    st.maxBudgetDailyMicros = max((c.budget_daily_micros for c in active), default=0)
    stats = CompileStats(len(active), paused, ad_count, conjunctions, lists, entries, max_k,
                         len(intern.strings))
    data: bytes = msg.to_bytes()
    step("serialise")
    # The stream header's first word is the segment count minus one.
    if int.from_bytes(data[:4], "little") == 0:
        return data, stats
    return _single_segment(msg), stats


def _single_segment(msg: Any) -> bytes:
    """The message re-laid into ONE segment. The builder grows segment by segment, and a
    multi-segment message makes every cross-segment read in the engine look the segment up
    (under a lock in libcapnp); one segment keeps the request path to plain pointer math."""
    words = msg.total_size.word_count
    single = capnp._MallocMessageBuilder(words + 8)
    single.set_root(msg)
    data: bytes = single.get_root(schema().Payload).to_bytes()
    return data


class _Conjunctions:
    """Distinct conjunctions and who owns them, numbered in campaign order."""

    def __init__(self, active: Sequence[Campaign]) -> None:
        self.ids: dict[Conjunction, int] = {}
        self.by_id: list[Conjunction] = []
        self.campaigns: list[list[int]] = []    # conjunction id -> owning campaign indexes
        self.of_campaign: list[list[int]] = []  # campaign index -> its conjunction ids
        for ci, camp in enumerate(active):
            mine: list[int] = []
            # Sorted, so the order conjunctions were authored in cannot change their ids.
            for conj in sorted(camp.targeting) or (_EMPTY,):
                cid = self.ids.get(conj)
                if cid is None:
                    cid = self.ids[conj] = len(self.campaigns)
                    self.by_id.append(conj)
                    self.campaigns.append([])
                owners = self.campaigns[cid]
                if not owners or owners[-1] != ci:
                    owners.append(ci)
                    mine.append(cid)
            self.of_campaign.append(mine)

    def reach(self, campaign: int) -> list[tuple[set[str] | None, set[str] | None, set[str]]]:
        """Per conjunction: (placements IN or None, countries IN or None, countries NOT IN):
        what the serving path's placement and country partitions need to know."""
        out = []
        for cid in self.of_campaign[campaign]:
            placements: set[str] | None = None
            countries: set[str] | None = None
            not_countries: set[str] = set()
            for p in self.by_id[cid].predicates:
                if p.attribute == "placement" and not p.negated:
                    placements = set(p.values)
                elif p.attribute == "country":
                    if p.negated:
                        not_countries = set(p.values)
                    else:
                        countries = set(p.values)
            out.append((placements, countries, not_countries))
        return out


def _write_campaigns(msg: Any, active: Sequence[Campaign], advertiser_index: dict[str, int],
                     creative_index: dict[str, int], intern: _Interner,
                     conjunctions: _Conjunctions, creative_sizes: Sequence[Any]) -> int:
    out = msg.init("campaigns", len(active))
    conj_pos = 0
    ads_total = sum(len(c.ads) for c in active)
    out_ads = msg.init("ads", ads_total)
    ad_pos = 0
    for i, camp in enumerate(active):
        o = out[i]
        o.id = intern(camp.id)
        o.advertiser = advertiser_index[camp.advertiser]
        o.name = intern(camp.name)
        o.start = camp.start
        o.end = camp.end
        o.priority = camp.priority
        o.weight = camp.weight
        # Zero is every field's default in Cap'n Proto: skipping those sets saves a million
        # attribute writes on a large compile and yields the same bytes.
        if camp.ecpm_micros:
            o.ecpmMicros = camp.ecpm_micros
        if camp.budget_total_micros:
            o.budgetTotalMicros = camp.budget_total_micros
        if camp.budget_daily_micros:
            o.budgetDailyMicros = camp.budget_daily_micros
        if camp.pacing is not Pacing.EVEN:
            o.pacing = camp.pacing.value
        if camp.caps:
            caps = o.init("caps", len(camp.caps))
            for j, cap in enumerate(sorted(camp.caps)):
                caps[j].count = cap.limit
                caps[j].windowSeconds = cap.window
                caps[j].scope = cap.scope.value
        if camp.exclusion_labels:
            o.exclusionLabels = sorted(intern(label) for label in camp.exclusion_labels)
        if ad_pos:
            o.adsStart = ad_pos
        o.adsCount = len(camp.ads)
        o.passThroughPpm = PASS_THROUGH_ALL
        mine = conjunctions.of_campaign[i]
        if conj_pos:
            o.conjunctionsStart = conj_pos
        o.conjunctionsCount = len(mine)
        o.idHash = id_hash(camp.id)
        conj_pos += len(mine)
        for ad in sorted(camp.ads):  # Ad sorts by id first
            a = out_ads[ad_pos]
            a.id = intern(ad.id)
            if i:
                a.campaign = i
            cre = creative_index[ad.creative]
            if cre:
                a.creative = cre
            a.weight = ad.weight
            size = creative_sizes[cre]
            a.width = size.width
            a.height = size.height
            ad_pos += 1
    return ads_total


def _write_placements(msg: Any, campaign_set: CampaignSet, active: Sequence[Campaign],
                      creatives: Sequence[Any], creative_index: dict[str, int],
                      intern: _Interner, conjunctions: _Conjunctions) -> None:
    placements = sorted(campaign_set.placements, key=lambda p: p.id.encode())
    placements_of_size: dict[tuple[int, int], list[int]] = {}
    for i, pl in enumerate(placements):
        for size in pl.sizes:
            placements_of_size.setdefault((size.width, size.height), []).append(i)
    # Per placement and country partition, the campaigns that can ever serve there, by tier.
    country_values = sorted({v for conj in conjunctions.by_id for p in conj.predicates
                             if p.attribute == "country" for v in p.values}, key=str.encode)
    partition_of = {country: k + 1 for k, country in enumerate(country_values)}
    n_partitions = len(country_values) + 1
    tiers: list[list[dict[int, list[int]]]] = [
        [{} for _ in range(n_partitions)] for _ in placements]
    for ci, camp in enumerate(active):
        fits: set[int] = set()
        for size in {creatives[creative_index[ad.creative]].size for ad in camp.ads}:
            fits.update(placements_of_size.get((size.width, size.height), ()))
        if not fits:
            continue
        reach = conjunctions.reach(ci)
        for pi in fits:
            pid = placements[pi].id
            # A campaign with a conjunction naming no country can serve any country: it goes
            # to partition 0 once (the engine draws from 0 and the request's country's
            # partition together). Otherwise it goes to the partitions of the countries its
            # conjunctions name. Exact country exclusions are left to the targeting check.
            parts: set[int] = set()
            for allowed, countries, excluded in reach:
                if allowed is not None and pid not in allowed:
                    continue
                if countries is None:
                    parts = {0}
                    break
                parts.update(partition_of[c] for c in countries if c not in excluded)
            for k in parts:
                tiers[pi][k].setdefault(camp.priority, []).append(ci)
    weights = [c.weight for c in active]
    out = msg.init("placements", len(placements))
    for i, pl in enumerate(placements):
        o = out[i]
        o.id = intern(pl.id)
        o.zone = intern(pl.zone)
        sizes = o.init("sizes", len(pl.sizes))
        for j, size in enumerate(pl.sizes):
            sizes[j].width = size.width
            sizes[j].height = size.height
        out_parts = o.init("partitions", n_partitions)
        for k in range(n_partitions):
            by_tier = tiers[i][k]
            out_tiers = out_parts[k].init("tiers", len(by_tier))
            for t, priority in enumerate(sorted(by_tier)):
                members = by_tier[priority]  # ascending: campaigns were visited in order
                out_tiers[t].priority = priority
                out_tiers[t].campaigns = members
                out_tiers[t].cumulativeWeights = list(
                    itertools.accumulate(weights[ci] for ci in members))


def _write_index(msg: Any, conjunctions: _Conjunctions) -> tuple[int, int, int, int]:
    """Write the k-index and the direct form of every conjunction; return (conjunctions,
    posting lists, posting entries, max K)."""
    conj_ids = conjunctions.ids
    conj_campaigns = conjunctions.campaigns

    values: list[set[str]] = [set() for _ in ATTRIBUTES]
    for conj in conj_ids:
        for p in conj.predicates:
            values[_ATTRIBUTE_NUMBER[p.attribute]].update(p.values)
    ordinals: list[dict[str, int]] = []
    out_attrs = msg.index.init("attributes", len(ATTRIBUTES))
    for a, name in enumerate(ATTRIBUTES):
        ordered = sorted(values[a], key=str.encode)
        ordinals.append({v: i for i, v in enumerate(ordered)})
        out_attrs[a].name = name
        out_attrs[a].values = ordered
        encoded = [v.encode() for v in ordered]
        out_attrs[a].blob, out_attrs[a].offsets = pack(encoded)
        out_attrs[a].slots = hash_slots(encoded)

    postings: dict[tuple[int, int, int], list[int]] = {}
    zero: list[int] = []
    sizes: list[int] = []
    max_k = 0
    for conj, cid in conj_ids.items():
        k = conj.size
        sizes.append(k)
        max_k = max(max_k, k)
        if k == 0:
            zero.append(cid << 1 | 1)
        for p in conj.predicates:
            a = _ATTRIBUTE_NUMBER[p.attribute]
            entry = cid << 1 | (0 if p.negated else 1)
            table = ordinals[a]
            for value in p.values:
                key = (k, a, table[value])
                found = postings.get(key)
                if found is None:
                    postings[key] = [entry]
                else:
                    found.append(entry)

    out_conj = msg.index.init("conjunctions", len(conj_campaigns))
    flat: list[int] = []
    program: list[int] = []
    starts: list[int] = []
    for (conj, cid), owners in zip(conj_ids.items(), conj_campaigns, strict=True):
        o = out_conj[cid]
        o.size = sizes[cid]
        o.campaignsStart = len(flat)
        o.campaignsCount = len(owners)
        flat.extend(owners)
        starts.append(len(program))
        program.append(len(conj.predicates))
        for p in conj.predicates:
            a = _ATTRIBUTE_NUMBER[p.attribute]
            table = ordinals[a]
            program.append(a << 1 | (1 if p.negated else 0))
            program.append(len(p.values))
            program.extend(sorted(table[v] for v in p.values))
    msg.index.conjunctionCampaigns = flat
    msg.index.zeroEntries = zero
    msg.index.program = program
    msg.index.conjunctionProgram = starts
    msg.index.campaignConjunctions = [c for mine in conjunctions.of_campaign for c in mine]

    by_bucket: list[list[tuple[int, int]]] = [[] for _ in range(max_k + 1)]
    for k, a, ordinal in postings:
        by_bucket[k].append((a, ordinal))
    out_buckets = msg.index.init("buckets", max_k + 1)
    entries_total = 0
    for k, keys in enumerate(by_bucket):
        keys.sort()
        out_lists = out_buckets[k].init("lists", len(keys))
        for j, (a, ordinal) in enumerate(keys):
            entries = postings[(k, a, ordinal)]
            entries.sort()
            entries_total += len(entries)
            o = out_lists[j]
            o.attribute = a
            o.value = ordinal
            o.entries = entries
    return len(conj_campaigns), len(postings), entries_total, max_k


@contextmanager
def open_payload(data: bytes | mmap.mmap,
                 nesting_limit: int = SnapshotSettings.nesting_limit
                 ) -> Iterator[Any]:
    """A reader over payload bytes, with traversal and nesting limits.

    The traversal limit is a multiple of the payload's size in words: enough to read every
    object a few times over, never enough for a crafted payload that points many list
    pointers at one large region (amplification) to make a reader loop for long.
    """
    limit = max(len(data) // 8 * 8, 1 << 20)
    try:
        with schema().Payload.from_bytes(data, traversal_limit_in_words=limit,
                                         nesting_limit=nesting_limit) as reader:
            yield reader
    except capnp.KjException as exc:
        raise PayloadError(f"payload is not a readable snapshot: {exc.description}",
                           hint="rebuild it, or fetch it again from the origin") from exc
