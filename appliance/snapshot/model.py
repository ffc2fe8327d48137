"""The campaign model: what advertisers buy, as authored, validated before anything compiles it.

Authoring: a folder of `.toml` and `.json` files; each may hold arrays `advertisers`,
`creatives`, `placements` and `campaigns` (see config/campaigns/ for a worked example).

Targeting is a DNF: a campaign matches a request when ANY of its conjunctions matches, and a
conjunction matches when ALL its predicates hold. A predicate is `attribute IN {..}` or
`attribute NOT IN {..}`; for a multi-valued attribute (keywords, segments) IN holds when any
request value is in the set and NOT IN holds when none is. A campaign without conjunctions
matches every request.
"""

from __future__ import annotations

import datetime as dt
import difflib
import gc
import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from appliance import config
from appliance.errors import AdpopError


class CampaignError(AdpopError):
    """The campaign set has problems; `problems` lists each with its campaign id and field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(self.problems[0] + more,
                         hint="fix the campaign files; every problem is listed with --debug")


# Targeting attributes in index order. The order is part of the snapshot format: the compiled
# index numbers attributes by their position here.
ATTRIBUTES: tuple[str, ...] = (
    "country", "region", "device", "os", "domain", "placement", "keyword", "segment", "hour",
)
_ATTRIBUTE_ORDER = {name: i for i, name in enumerate(ATTRIBUTES)}
DEVICE_TYPES = frozenset({"desktop", "mobile", "tablet", "ctv", "other"})
HOURS_PER_WEEK = 168
MAX_PRIORITY = 16
MICROS = 1_000_000


class Pacing(str, Enum):
    """How a campaign spends its daily budget across the day."""

    EVEN = "even"
    ASAP = "asap"
    FRONTLOADED = "frontloaded"


_PACING = {p.value: p for p in Pacing}


class CapScope(str, Enum):
    """What a frequency cap counts impressions of."""

    CAMPAIGN = "campaign"
    ADVERTISER = "advertiser"


class CreativeKind(str, Enum):
    """What the engine sends back: markup inline, or a URL the client fetches."""

    IMAGE = "image"
    HTML = "html"
    VIDEO = "video"
    NATIVE = "native"


class Size(NamedTuple):
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Advertiser:
    id: str
    name: str


@dataclass(frozen=True)
class Creative:
    id: str
    advertiser: str
    kind: CreativeKind
    size: Size
    body: str
    url: str
    landing_url: str


@dataclass(frozen=True)
class Placement:
    id: str
    zone: str
    sizes: tuple[Size, ...]


class FrequencyCap(NamedTuple):
    limit: int  # impressions allowed per window (authored as `count`)
    window: int  # seconds
    scope: CapScope


class Predicate(NamedTuple):
    attribute: str
    negated: bool
    values: tuple[str, ...]  # sorted, distinct


class Conjunction(NamedTuple):
    """AND of predicates; at most one IN and one NOT IN predicate per attribute, sorted."""

    predicates: tuple[Predicate, ...]

    @property
    def size(self) -> int:
        """The k-index conjunction size: how many attributes carry an IN predicate."""
        return sum(1 for p in self.predicates if not p.negated)


class Ad(NamedTuple):
    id: str
    creative: str
    weight: int


@dataclass(frozen=True)
class Campaign:
    id: str
    advertiser: str
    name: str
    start: int  # unix seconds, inclusive
    end: int  # unix seconds, exclusive
    priority: int  # tier: 1 is served first, 16 last (house ads)
    weight: int
    ecpm_micros: int
    budget_total_micros: int  # 0: unlimited
    budget_daily_micros: int  # 0: unlimited
    pacing: Pacing
    caps: tuple[FrequencyCap, ...]
    exclusion_labels: tuple[str, ...]
    targeting: tuple[Conjunction, ...]
    ads: tuple[Ad, ...]
    paused: bool = False


@dataclass(frozen=True)
class CampaignSet:
    advertisers: tuple[Advertiser, ...]
    creatives: tuple[Creative, ...]
    placements: tuple[Placement, ...]
    campaigns: tuple[Campaign, ...]


@dataclass(frozen=True)
class Request:
    """What the targeting sees of one ad request for one placement: attribute -> values."""

    values: Mapping[str, tuple[str, ...]]


def matches(conjunction: Conjunction, request: Request) -> bool:
    """Direct rule evaluation of one conjunction (the reference the index must agree with)."""
    for predicate in conjunction.predicates:
        present = request.values.get(predicate.attribute, ())
        hit = any(v in predicate.values for v in present)
        if hit == predicate.negated:
            return False
    return True


def campaign_matches(campaign: Campaign, request: Request) -> bool:
    if not campaign.targeting:
        return True
    return any(matches(c, request) for c in campaign.targeting)


# ---------------------------------------------------------------------------------------------
# Authoring: parse and validate, collecting every problem with its campaign id and field.


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.good_values: dict[str, set[Any]] = {a: set() for a in ATTRIBUTES}
        self.source = ""  # the file being read: every problem names it

    def add(self, where: str, field: str, message: str) -> None:
        self.lines.append(f"{self.source}: {where}: {field}: {message}")

    def unknown_keys(self, raw: Mapping[str, Any], known: Iterable[str], where: str,
                     prefix: str = "") -> None:
        """A misspelt key (`prority`) would silently take the default: refuse it."""
        known = tuple(known)
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                self.add(where, f"{prefix}{key}", "unknown key; " + (
                    f"did you mean '{prefix}{close[0]}'?" if close
                    else f"use one of {', '.join(known)}"))


# The keys each authored table may hold.
CAMPAIGN_KEYS = ("id", "advertiser", "name", "start", "end", "priority", "weight", "ecpm",
                 "budget_total", "budget_daily", "pacing", "frequency_caps", "exclusion_labels",
                 "targeting", "ads", "paused")
AD_KEYS = ("id", "creative", "weight")
CAP_KEYS = ("count", "window", "scope")
CREATIVE_KEYS = ("id", "advertiser", "name", "type", "size", "body", "url", "landing_url")
PLACEMENT_KEYS = ("id", "name", "zone", "sizes")
ADVERTISER_KEYS = ("id", "name")


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SIZE = re.compile(r"(\d{1,4})x(\d{1,4})")
_COUNTRY = re.compile(r"[A-Z]{2}")
_DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def parse_size(text: Any) -> Size | None:
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if not match:
        return None
    size = Size(int(match.group(1)), int(match.group(2)))
    return size if size.width > 0 and size.height > 0 else None


def parse_time(value: Any) -> int | None:
    """Unix seconds from a TOML datetime, an ISO 8601 string or an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp())
    if isinstance(value, dt.date):
        return int(dt.datetime(value.year, value.month, value.day,
                               tzinfo=dt.UTC).timestamp())
    return None


def parse_duration(value: Any) -> int | None:
    """Seconds, as in configuration files ("30m", "1d", "1w" or an integer); None if bad."""
    try:
        return config.parse_duration(value)
    except config.ValueProblem:
        return None


def _wrapping(first: int, last: int, size: int) -> range:
    """first..last, both included; a `last` before `first` wraps past size - 1 to 0 (the
    caller takes each value modulo `size`)."""
    return range(first, first + (last - first) % size + 1)


def parse_hours(values: Iterable[Any]) -> list[str] | None:
    """Hour-of-week values (0 = Monday 00:00 UTC .. 167) from ints, "a-b" ranges or day specs
    such as "mon-fri 09-17". One rule for every range: both ends are included (an hour means
    the whole hour, so "09-17" runs from 09:00 to 17:59), and a range whose end comes before
    its start wraps around: "166-1" is 166, 167, 0, 1; "fri-mon" is Friday to Monday;
    "mon 22-02" is Monday 22:00 to Tuesday 02:59. None when a value is not one of these."""
    hours: set[int] = set()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < HOURS_PER_WEEK:
                return None
            hours.add(value)
            continue
        if not isinstance(value, str):
            return None
        text = value.strip().lower()
        day = re.fullmatch(r"([a-z]{3})(?:-([a-z]{3}))?\s+(\d{1,2})-(\d{1,2})", text)
        span = re.fullmatch(r"(\d{1,3})-(\d{1,3})", text)
        if day and day.group(1) in _DAYS and (day.group(2) or day.group(1)) in _DAYS:
            first, last = _DAYS[day.group(1)], _DAYS[day.group(2) or day.group(1)]
            start, end = int(day.group(3)), int(day.group(4))
            if not (0 <= start < 24 and 0 <= end < 24):
                return None
            for d in _wrapping(first, last, 7):
                hours.update((d % 7 * 24 + h) % HOURS_PER_WEEK
                             for h in _wrapping(start, end, 24))
        elif span:
            start, end = int(span.group(1)), int(span.group(2))
            if not (0 <= start < HOURS_PER_WEEK and 0 <= end < HOURS_PER_WEEK):
                return None
            hours.update(h % HOURS_PER_WEEK for h in _wrapping(start, end, HOURS_PER_WEEK))
        elif text.isdigit() and int(text) < HOURS_PER_WEEK:
            hours.add(int(text))
        else:
            return None
    return [str(h) for h in sorted(hours)]


def _money_micros(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return round(value * MICROS)


def _remember(seen: set[Any], attribute: str, value: Any) -> bool:
    """Check a targeting value; remember it when good."""
    try:
        good = isinstance(value, str) and _check_value(attribute, value)
    except TypeError:  # unhashable junk in the value list
        return False
    if good:
        seen.add(value)
    return good


def _check_value(attribute: str, value: str) -> bool:
    if attribute == "country":
        return bool(_COUNTRY.fullmatch(value))
    if attribute == "device":
        return value in DEVICE_TYPES
    return 0 < len(value) <= 256


def _parse_conjunction(raw: Any, where: str, field: str, problems: _Problems) -> Conjunction | None:
    if not isinstance(raw, dict):
        problems.add(where, field, "a targeting entry must be a table of attribute = [values]")
        return None
    included: dict[str, set[str]] = {}
    excluded: dict[str, set[str]] = {}
    ok = True
    items = [(k, v, False) for k, v in raw.items() if k != "exclude"]
    exclude = raw.get("exclude", {})
    if not isinstance(exclude, dict):
        problems.add(where, f"{field}.exclude", "must be a table of attribute = [values]")
        return None
    items += [(k, v, True) for k, v in exclude.items()]
    for attribute, values, negated in items:
        name = f"{field}.{'exclude.' if negated else ''}{attribute}"
        if attribute not in ATTRIBUTES:
            close = difflib.get_close_matches(str(attribute), ATTRIBUTES, n=1, cutoff=0.6)
            problems.add(where, name, "unknown attribute; " + (
                f"did you mean '{close[0]}'?" if close
                else f"use one of {', '.join(ATTRIBUTES)}"))
            ok = False
            continue
        if not isinstance(values, list) or not values:
            problems.add(where, name, "must be a non-empty list of values")
            ok = False
            continue
        if attribute == "hour":
            parsed = parse_hours(values)
            if parsed is None:
                problems.add(where, name,
                             'hours are 0-167 (Monday 00:00 UTC = 0), "a-b" or "mon-fri 09-17" '
                             "(hours of the day 00-23); both ends are included and a reversed "
                             "range wraps around")
                ok = False
                continue
            clean = set(parsed)
        else:
            # Values repeat across a large set (countries, devices, segments): each distinct
            # one is checked once per parse.
            seen = problems.good_values[attribute]
            bad = [v for v in values if v not in seen and not _remember(seen, attribute, v)]
            if bad:
                hint = {"country": "ISO 3166 alpha-2 in capitals, e.g. \"US\"",
                        "device": f"one of {', '.join(sorted(DEVICE_TYPES))}"}.get(
                            attribute, "non-empty strings up to 256 characters")
                problems.add(where, name, f"bad value {bad[0]!r}; use {hint}")
                ok = False
                continue
            clean = set(values)
        (excluded if negated else included).setdefault(attribute, set()).update(clean)
    if not ok:
        return None
    predicates = [Predicate(a, False, tuple(sorted(v))) for a, v in included.items()]
    predicates += [Predicate(a, True, tuple(sorted(v))) for a, v in excluded.items()]
    return Conjunction(tuple(sorted(predicates, key=lambda p: (_ATTRIBUTE_ORDER[p.attribute],
                                                                p.negated))))


def _str(raw: Mapping[str, Any], key: str, where: str, problems: _Problems,
         default: str | None = None, pattern: re.Pattern[str] | None = None,
         prefix: str = "") -> str:
    """`prefix` names the table inside the campaign (`ads[2].`) so the field is exact."""
    value = raw.get(key, default)
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        what = "an id of letters, digits, '.', '_', ':' or '-'" if pattern else "a string"
        problems.add(where, f"{prefix}{key}", f"missing or not {what}")
        return ""
    return value


def _int(raw: Mapping[str, Any], key: str, where: str, problems: _Problems, default: int,
         low: int, high: int, prefix: str = "") -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.add(where, f"{prefix}{key}", f"must be a whole number from {low} to {high}")
        return default
    return value


def _parse_campaign(raw: Any, problems: _Problems) -> Campaign | None:
    if not isinstance(raw, dict):
        problems.add("campaigns", "entry", "each campaign must be a table")
        return None
    cid = raw.get("id")
    where = f"campaign {cid}" if isinstance(cid, str) else "campaign without id"
    before = len(problems.lines)
    problems.unknown_keys(raw, CAMPAIGN_KEYS, where)
    campaign_id = _str(raw, "id", where, problems, pattern=_ID)
    advertiser = _str(raw, "advertiser", where, problems, pattern=_ID)
    start = parse_time(raw.get("start"))
    end = parse_time(raw.get("end"))
    if start is None:
        problems.add(where, "start", "missing or not a time; use e.g. 2026-01-01T00:00:00Z")
    if end is None:
        problems.add(where, "end", "missing or not a time; use e.g. 2026-12-31T00:00:00Z")
    if start is not None and end is not None and end <= start:
        problems.add(where, "end", "must be after start")
    priority = _int(raw, "priority", where, problems, 8, 1, MAX_PRIORITY)
    weight = _int(raw, "weight", where, problems, 1, 1, 1_000_000)
    ecpm = _money_micros(raw.get("ecpm", 0))
    if ecpm is None or ecpm > 1000 * MICROS:
        problems.add(where, "ecpm", "must be a price from 0 to 1000 (currency units per mille)")
    total = _money_micros(raw.get("budget_total", 0))
    daily = _money_micros(raw.get("budget_daily", 0))
    if total is None:
        problems.add(where, "budget_total", "must be a non-negative amount (0: unlimited)")
    if daily is None:
        problems.add(where, "budget_daily", "must be a non-negative amount (0: unlimited)")
    if total and daily and daily > total:
        problems.add(where, "budget_daily", "exceeds budget_total")
    pacing_raw = raw.get("pacing", "even")
    pacing = _PACING.get(pacing_raw) if isinstance(pacing_raw, str) else None
    if pacing is None:
        problems.add(where, "pacing", f"unknown {pacing_raw!r}; use even, asap or frontloaded")
        pacing = Pacing.EVEN
    caps: list[FrequencyCap] = []
    raw_caps = raw.get("frequency_caps", [])
    for i, cap in enumerate(raw_caps if isinstance(raw_caps, list) else [None]):
        field = f"frequency_caps[{i}]"
        if not isinstance(cap, dict):
            problems.add(where, field, "must be a table {count, window, scope}")
            continue
        problems.unknown_keys(cap, CAP_KEYS, where, f"{field}.")
        count = cap.get("count")
        window = parse_duration(cap.get("window"))
        try:
            scope = CapScope(cap.get("scope", "campaign"))
        except ValueError:
            problems.add(where, f"{field}.scope", "use campaign or advertiser")
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            problems.add(where, f"{field}.count", "must be a whole number of at least 1")
            continue
        if window is None or window < 60:
            problems.add(where, f"{field}.window", 'must be a duration of at least "1m"')
            continue
        caps.append(FrequencyCap(count, window, scope))
    labels = raw.get("exclusion_labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        problems.add(where, "exclusion_labels", "must be a list of non-empty strings")
        labels = []
    targeting: list[Conjunction] = []
    raw_targets = raw.get("targeting", [])
    if not isinstance(raw_targets, list):
        problems.add(where, "targeting", "must be a list of conjunction tables")
        raw_targets = []
    for i, entry in enumerate(raw_targets):
        conj = _parse_conjunction(entry, where, f"targeting[{i}]", problems)
        if conj is not None and all(conj is not t and conj != t for t in targeting):
            targeting.append(conj)
    ads: list[Ad] = []
    raw_ads = raw.get("ads", [])
    if not isinstance(raw_ads, list) or not raw_ads:
        problems.add(where, "ads", "needs at least one ad {id, creative}")
        raw_ads = []
    for i, ad in enumerate(raw_ads):
        if not isinstance(ad, dict):
            problems.add(where, f"ads[{i}]", "must be a table {id, creative, weight}")
            continue
        field = f"ads[{i}]."
        problems.unknown_keys(ad, AD_KEYS, where, field)
        ads.append(Ad(
            id=_str(ad, "id", where, problems, pattern=_ID, prefix=field),
            creative=_str(ad, "creative", where, problems, pattern=_ID, prefix=field),
            weight=_int(ad, "weight", where, problems, 1, 1, 1_000_000, prefix=field),
        ))
    paused = raw.get("paused", False)
    if not isinstance(paused, bool):
        problems.add(where, "paused", "must be true or false")
        paused = False
    if len(problems.lines) > before:
        return None
    assert start is not None and end is not None and ecpm is not None
    return Campaign(
        id=campaign_id, advertiser=advertiser, name=str(raw.get("name", campaign_id)),
        start=start, end=end, priority=priority, weight=weight, ecpm_micros=ecpm,
        budget_total_micros=total or 0, budget_daily_micros=daily or 0, pacing=pacing,
        caps=tuple(caps), exclusion_labels=tuple(sorted(set(labels))),
        targeting=tuple(targeting), ads=tuple(ads), paused=paused,
    )


def _parse_creative(raw: Any, problems: _Problems) -> Creative | None:
    if not isinstance(raw, dict):
        problems.add("creatives", "entry", "each creative must be a table")
        return None
    where = f"creative {raw.get('id')}"
    before = len(problems.lines)
    problems.unknown_keys(raw, CREATIVE_KEYS, where)
    cid = _str(raw, "id", where, problems, pattern=_ID)
    advertiser = _str(raw, "advertiser", where, problems, pattern=_ID)
    try:
        kind = CreativeKind(raw.get("type", "image"))
    except ValueError:
        problems.add(where, "type", "use image, html, video or native")
        kind = CreativeKind.IMAGE
    size = parse_size(raw.get("size"))
    if size is None:
        problems.add(where, "size", 'must be "WIDTHxHEIGHT", e.g. "300x250"')
    body, url = raw.get("body", ""), raw.get("url", "")
    if not isinstance(body, str) or not isinstance(url, str) or bool(body) == bool(url):
        problems.add(where, "body", "give exactly one of body (markup) or url")
    landing = raw.get("landing_url")
    if not isinstance(landing, str) or not landing.startswith(("https://", "http://")):
        problems.add(where, "landing_url", "must be an http(s) URL")
    if len(problems.lines) > before:
        return None
    assert size is not None and isinstance(landing, str)
    return Creative(cid, advertiser, kind, size, body, url, landing)


def _parse_placement(raw: Any, problems: _Problems) -> Placement | None:
    if not isinstance(raw, dict):
        problems.add("placements", "entry", "each placement must be a table")
        return None
    where = f"placement {raw.get('id')}"
    before = len(problems.lines)
    problems.unknown_keys(raw, PLACEMENT_KEYS, where)
    pid = _str(raw, "id", where, problems, pattern=_ID)
    zone = _str(raw, "zone", where, problems, pattern=_ID)
    raw_sizes = raw.get("sizes")
    sizes = [parse_size(s) for s in raw_sizes] if isinstance(raw_sizes, list) else [None]
    if not sizes or None in sizes:
        problems.add(where, "sizes", 'must be a non-empty list like ["300x250", "728x90"]')
    if len(problems.lines) > before:
        return None
    return Placement(pid, zone, tuple(sorted({s for s in sizes if s is not None})))


def read_documents(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every `.toml` and `.json` file under `folder`, parsed, in path order."""
    if not folder.is_dir():
        raise CampaignError([f"{folder}: not a folder; give the folder of campaign files"])
    documents: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    for path in sorted(folder.rglob("*")):
        if path.suffix not in (".toml", ".json") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{path}: cannot parse: {exc}")
            continue
        if not isinstance(doc, dict):
            problems.append(f"{path}: top level must be a table/object")
            continue
        documents.append((str(path), doc))
    if problems:
        raise CampaignError(problems)
    if not documents:
        raise CampaignError([f"{folder}: no .toml or .json campaign files found"])
    return documents


def load_campaigns(folder: Path) -> CampaignSet:
    """Parse and validate the campaign files in `folder`.

    Raises CampaignError naming the campaign (or creative, placement) and field of every
    problem; nothing half-valid is returned.
    """
    return parse_documents(read_documents(folder))


_SECTIONS = ("advertisers", "creatives", "placements", "campaigns")


@contextmanager
def bulk_allocation() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of acyclic objects.

    Without this, CPython's generational collector rescans the growing heap over and over and
    more than doubles the time to parse or compile a million campaigns.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_documents(documents: Sequence[tuple[str, Mapping[str, Any]]]) -> CampaignSet:
    """Validate authoring documents [(source name, parsed file)] into a campaign set."""
    with bulk_allocation():
        return _parse_documents(documents)


def _parse_documents(documents: Sequence[tuple[str, Mapping[str, Any]]]) -> CampaignSet:
    problems = _Problems()
    advertisers: list[Advertiser] = []
    creatives: list[Creative] = []
    placements: list[Placement] = []
    campaigns: list[Campaign] = []
    sources: dict[tuple[str, str], list[str]] = {}  # (kind, id) -> the files defining it
    for source, doc in documents:
        problems.source = source
        for key in doc:
            if key not in _SECTIONS:
                close = difflib.get_close_matches(str(key), _SECTIONS, n=1, cutoff=0.6)
                problems.add("file", key, "unknown section; " + (
                    f"did you mean '{close[0]}'?" if close else f"use {', '.join(_SECTIONS)}"))
        for raw in doc.get("advertisers", []):
            if isinstance(raw, dict) and isinstance(raw.get("id"), str) \
                    and _ID.fullmatch(raw["id"]):
                problems.unknown_keys(raw, ADVERTISER_KEYS, f"advertiser {raw['id']}")
                advertisers.append(Advertiser(raw["id"], str(raw.get("name", raw["id"]))))
                sources.setdefault(("advertiser", raw["id"]), []).append(source)
            else:
                problems.add("advertisers", "id", f"entry {raw!r} needs a valid id")
        for raw in doc.get("creatives", []):
            creative = _parse_creative(raw, problems)
            if creative:
                creatives.append(creative)
                sources.setdefault(("creative", creative.id), []).append(source)
        for raw in doc.get("placements", []):
            placement = _parse_placement(raw, problems)
            if placement:
                placements.append(placement)
                sources.setdefault(("placement", placement.id), []).append(source)
        for raw in doc.get("campaigns", []):
            campaign = _parse_campaign(raw, problems)
            if campaign:
                campaigns.append(campaign)
                sources.setdefault(("campaign", campaign.id), []).append(source)
                for ad in campaign.ads:
                    sources.setdefault(("ad", ad.id), []).append(source)
    _cross_check(advertisers, creatives, placements, campaigns, problems, sources)
    if problems.lines:
        raise CampaignError(problems.lines)
    return CampaignSet(tuple(advertisers), tuple(creatives), tuple(placements), tuple(campaigns))


def _duplicates(ids: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    return dups


def _cross_check(advertisers: Sequence[Advertiser], creatives: Sequence[Creative],
                 placements: Sequence[Placement], campaigns: Sequence[Campaign],
                 problems: _Problems, sources: Mapping[tuple[str, str], list[str]]) -> None:
    for kind, ids in (("advertiser", [a.id for a in advertisers]),
                      ("creative", [c.id for c in creatives]),
                      ("placement", [p.id for p in placements]),
                      ("campaign", [c.id for c in campaigns]),
                      ("ad", [ad.id for c in campaigns for ad in c.ads])):
        for dup in _duplicates(ids):
            files = sources.get((kind, dup), ["campaign set"])
            problems.source = files[-1]
            problems.add(f"{kind} {dup}", "id", f"duplicate {kind} id (also in {files[0]}); "
                         "ids must be unique")
    if not placements:
        problems.source = "campaign set"
        problems.add("campaign set", "placements", "no placements defined; add at least one")
    advertiser_ids = {a.id for a in advertisers}
    creative_by_id = {c.id: c for c in creatives}
    placement_ids = {p.id for p in placements}
    for cre in creatives:
        problems.source = sources.get(("creative", cre.id), ["campaign set"])[0]
        if cre.advertiser not in advertiser_ids:
            problems.add(f"creative {cre.id}", "advertiser",
                         f"unknown advertiser {cre.advertiser!r}")
    for campaign in campaigns:
        where = f"campaign {campaign.id}"
        problems.source = sources.get(("campaign", campaign.id), ["campaign set"])[0]
        if campaign.advertiser not in advertiser_ids:
            problems.add(where, "advertiser", f"unknown advertiser {campaign.advertiser!r}")
        for i, ad in enumerate(campaign.ads):
            creative = creative_by_id.get(ad.creative)
            if creative is None:
                problems.add(where, f"ads[{i}].creative", f"unknown creative {ad.creative!r}")
            elif creative.advertiser != campaign.advertiser:
                problems.add(where, f"ads[{i}].creative",
                             f"creative {ad.creative!r} belongs to another advertiser")
        for i, conj in enumerate(campaign.targeting):
            for predicate in conj.predicates:
                if predicate.attribute != "placement":
                    continue
                unknown = [v for v in predicate.values if v not in placement_ids]
                if unknown:
                    problems.add(where, f"targeting[{i}].placement",
                                 f"unknown placement {unknown[0]!r}")
