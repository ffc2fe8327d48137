"""The origin's event store (issue 23): PoPs' batches checked, priced and stored exactly once
in DuckDB, and reported.

A batch (appliance/events/batch.py) is stored in one transaction with its id, and answered
only after the commit. Exactly once holds at three levels:
- a batch id seen before is acknowledged again, nothing stored;
- every record is named for good by where it was written (PoP, segment, offset), so a batch
  cut differently after a shipper's crash stores only the records not yet stored;
- an impression is one per request and ad, as the engine's own dedup window counts it: a
  pixel fired again after an engine restart (whose window was lost) is stored once.

Each served ad, impression and click is priced at its campaign's eCPM in the snapshot version
that served it, read from that version's published payload. A batch that cannot be trusted
(framing, CRC, an unknown version, campaign or ad, another PoP's id, absurd times) is refused
whole with a named reason, counted, and changes nothing.
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]  # no stubs published
import zstandard

from appliance.errors import AdpopError
from appliance.events.batch import frames
from appliance.snapshot.compiler import open_payload, string_table
from appliance.spool import MAX_RECORD, EventType, crc32c

STORE_FILE = "events.duckdb"
# Decompressed: events.batch_bytes's largest, or one record past it; compressed, as it
# arrives (records that do not compress at all come a little larger than they are).
MAX_BATCH_BYTES = (16 << 20) + MAX_RECORD + 8
MAX_BODY_BYTES = MAX_BATCH_BYTES + (1 << 20)
BATCH_ID = re.compile(r"([a-z0-9][a-z0-9._-]{0,62})/(shard-[0-9]{1,6}-[0-9]{1,12}-[0-9]{1,12})/"
                      r"([0-9]{1,15})-([0-9]{1,15})")
# Event times a PoP may claim, around the origin's clock.
FUTURE_SLACK_MS = 86_400_000
PAST_LIMIT_MS = 400 * 86_400_000
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A staged batch's impressions: how many at or under each bucket's bound of lag (commit
# time, the parameter, minus event time), their lag's sum in seconds, and how many.
LAG_QUERY = ("SELECT " + ", ".join(
    f"count(*) FILTER (WHERE greatest($1 - time, 0) <= {bound * 1000:g})"
    for bound in LAG_BUCKETS) + ", sum(greatest($1 - time, 0)) / 1000, count(*) "
    "FROM staged WHERE type = 2")

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id VARCHAR PRIMARY KEY, pop VARCHAR NOT NULL, records UINTEGER NOT NULL,
    stored UINTEGER NOT NULL, duplicates UINTEGER NOT NULL, received TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    key UHUGEINT PRIMARY KEY,       -- the event's identity (module docstring)
    type VARCHAR NOT NULL,          -- decision, served, impression, click
    time TIMESTAMP NOT NULL,        -- when the engine recorded it
    stored TIMESTAMP NOT NULL,      -- when the origin committed it
    pop VARCHAR NOT NULL,
    version UINTEGER NOT NULL,      -- the snapshot version that served it
    campaign VARCHAR, advertiser VARCHAR, ad VARCHAR, placement VARCHAR,
    request_id VARCHAR,             -- decisions and served ads
    request_hash UBIGINT,           -- impressions and clicks (FNV-1a of the request id)
    ads USMALLINT,                  -- decisions: ads in the answer
    price_micros UBIGINT            -- the campaign's eCPM in that version, micros
);
"""


REASONS = {"bad-framing": "its frame runs past the batch", "bad-crc": "it fails its CRC-32C",
           "bad-record": "it does not decode as a decision, impression or click",
           "bad-range": "the records do not fill the id's byte range"}


class EventStoreError(AdpopError):
    """The event store cannot be opened or written."""


class Refused(AdpopError):
    """A batch refused whole: `reason` names why, for the counters and the PoP."""

    def __init__(self, reason: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Campaign:
    advertiser: str
    ecpm_micros: int
    ads: frozenset[str]


class Catalog:
    """What each published snapshot version held: campaign id -> Campaign. Read from the
    version's payload when first asked, then kept (versions never change)."""

    def __init__(self, payload_of: Callable[[int], bytes | None], keep: int = 64) -> None:
        self.payload_of = payload_of
        self.keep = keep
        self.versions: dict[int, dict[str, Campaign]] = {}
        self.lock = threading.Lock()

    def campaigns(self, version: int) -> dict[str, Campaign] | None:
        with self.lock:
            found = self.versions.get(version)
        if found is not None:
            return found
        payload = self.payload_of(version)
        if payload is None:
            return None
        with open_payload(payload) as p:
            strings = string_table(p)
            advertisers = [strings[a.id] for a in p.advertisers]
            ads = [strings[a.id] for a in p.ads]
            found = {strings[c.id]: Campaign(advertisers[c.advertiser], int(c.ecpmMicros),
                                             frozenset(ads[c.adsStart:c.adsStart + c.adsCount]))
                     for c in p.campaigns}
        with self.lock:
            if len(self.versions) >= self.keep:
                self.versions.pop(min(self.versions))
            self.versions[version] = found
        return found


@dataclass
class Counts:
    """What intake has done since the origin started: for /metrics."""

    batches: Counter[str] = field(default_factory=Counter)  # by PoP
    events: Counter[str] = field(default_factory=Counter)  # by PoP
    duplicate_batches: int = 0
    duplicate_events: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by reason
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))
    lag_sum: float = 0.0
    lag_count: int = 0

    def add_lag(self, counted: tuple[Any, ...]) -> None:
        """LAG_QUERY's row: the count at or under each bucket's bound, the sum of the
        seconds, and the count."""
        *cumulative, total_seconds, count = counted
        below = 0
        for i, at_most in enumerate(cumulative):
            self.lag_buckets[i] += int(at_most or 0) - below
            below = int(at_most or 0)
        self.lag_buckets[-1] += int(count or 0) - below
        self.lag_sum += float(total_seconds or 0.0)
        self.lag_count += int(count or 0)


@dataclass(frozen=True)
class Outcome:
    batch: str
    outcome: str  # "stored" or "duplicate"
    events: int  # rows stored now
    duplicates: int  # rows already held (records stored before under another batch)


_HEAD = struct.Struct("<BQ")
_PIXELS = (EventType.IMPRESSION, EventType.CLICK)
_U16 = struct.Struct("<H")
_TAIL = struct.Struct("<III")


def _pixel(body: bytes) -> tuple[str, str, str, int, int]:
    """(campaign, ad, placement, request hash, version) of an impression or click record
    (engine/SPOOL.md), read without appliance.spool's general decoder's call per field: the
    intake reads every record of the fleet."""
    pos = 9
    texts = []
    for _ in range(3):
        (n,) = _U16.unpack_from(body, pos)
        if pos + 2 + n > len(body):
            raise ValueError("a string runs past the record")
        texts.append(body[pos + 2:pos + 2 + n].decode())
        pos += 2 + n
    low, high, version = _TAIL.unpack_from(body, pos)
    if pos + 12 != len(body):
        raise ValueError(f"{len(body) - pos - 12} bytes after the fields of a pixel")
    return texts[0], texts[1], texts[2], low | high << 32, version


_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")


def _decision(body: bytes) -> tuple[str, int, list[tuple[str, list[tuple[str, str]]]]]:
    """(request id, version, [(placement, [(campaign, ad)])]) of a decision record."""
    def text(pos: int) -> tuple[str, int]:
        (n,) = _U16.unpack_from(body, pos)
        end = pos + 2 + n
        if end > len(body):
            raise ValueError("a string runs past the record")
        return body[pos + 2:end].decode(), end

    request_id, pos = text(9)
    _user, pos = text(pos)
    version, count = _U32X2.unpack_from(body, pos)
    pos += 8
    placements = []
    for _ in range(count):
        placement, pos = text(pos)
        (n,) = _U32.unpack_from(body, pos)
        pos += 4
        ads = []
        for _ in range(n):
            campaign, pos = text(pos)
            ad, pos = text(pos)
            ads.append((campaign, ad))
        placements.append((placement, ads))
    if pos != len(body):
        raise ValueError(f"{len(body) - pos} bytes after the fields of a decision")
    return request_id, version, placements


# A batch's rows as they are staged (appliance/origin/columns.py's layout: the C decoder and
# `reference_table` both make it), and how they become stored ones. Each row's key names it
# for good (module docstring; the identity texts are in engine/src/event_columns.cpp): an
# impression by request, campaign, ad and placement; a decision and a click by where its
# record was written; a served ad by its decision and its place in the answer.
INSERT = """
INSERT INTO events SELECT
    (s.key_hi::UHUGEINT << 64) + s.key_lo,
    CASE s.type WHEN 1 THEN 'decision' WHEN 2 THEN 'impression' WHEN 3 THEN 'click'
                ELSE 'served' END,
    make_timestamp_ms(s.time), make_timestamp_ms($stamp), $pop, s.version,
    nullif(s.campaign, ''), p.advertiser, nullif(s.ad, ''), nullif(s.placement, ''),
    nullif(s.request_id, ''), CASE WHEN s.type IN (2, 3) THEN s.request_hash END,
    CASE WHEN s.type = 1 THEN s.ads END, p.price
FROM staged s LEFT JOIN prices p ON p.version = s.version AND p.campaign = s.campaign
ON CONFLICT DO NOTHING"""
ROW_TYPES = {EventType.DECISION: 1, EventType.IMPRESSION: 2, EventType.CLICK: 3}
SERVED = 4


def identity_key(*parts: str) -> tuple[int, int]:
    """A row's key from its identity text, as the C decoder makes it: the first 16 bytes of
    SHA-256 over the parts joined by 0x1F, as (high, low) 64-bit halves."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")


def reference_table(pop: str, segment: str, records: Iterator[tuple[int, bytes]]
                    ) -> tuple[Any, int, int] | str:
    """The staged table of `records` decoded in Python: where the C decoder is not built,
    and what the tests hold it to. Returns (table, earliest, latest time) or the refusal."""
    from appliance.origin.columns import FIXED, STRINGS

    rows: list[tuple[Any, ...]] = []
    append = rows.append
    times: list[int] = []
    for offset, body in records:
        try:
            kind, time_ms = _HEAD.unpack_from(body)
            if kind in _PIXELS:
                campaign_id, ad_id, placement, request_hash, version = _pixel(body)
                key = identity_key("impression", str(request_hash), campaign_id, ad_id,
                                   placement) if kind == EventType.IMPRESSION else \
                    identity_key("record", pop, segment, str(offset))
                append((ROW_TYPES[EventType(kind)], time_ms, offset, 0, 0, version,
                        request_hash, 0, *key, campaign_id, ad_id, placement, ""))
            elif kind == EventType.DECISION:
                request_id, version, placements = _decision(body)
                served = 0
                for index, (placement, ads) in enumerate(placements):
                    for slot, (campaign_id, ad_id) in enumerate(ads):
                        key = identity_key("served", pop, segment, str(offset), str(index),
                                           str(slot))
                        append((SERVED, time_ms, offset, index, slot, version, 0, 0, *key,
                                campaign_id, ad_id, placement, request_id))
                        served += 1
                append((1, time_ms, offset, 0, 0, version, 0, min(served, 65535),
                        *identity_key("record", pop, segment, str(offset)), "", "", "",
                        request_id))
            else:
                raise ValueError(f"no record type {kind}")
        except (ValueError, struct.error, IndexError, UnicodeDecodeError):
            return f"bad-record at {segment}:{offset}"
        times.append(time_ms)
    names = [name for name, _, _ in FIXED] + list(STRINGS)
    kinds = [getattr(pa, kind)() for _, kind, _ in FIXED] + [pa.string()] * len(STRINGS)
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
    table = pa.table({name: pa.array(values, kind)
                      for name, kind, values in zip(names, kinds, columns, strict=True)})
    return table, min(times, default=0), max(times, default=0)


def parse_id(batch_id: str) -> tuple[str, str, int, int]:
    """(pop, segment, start, end) of a batch id; raises Refused."""
    match = BATCH_ID.fullmatch(batch_id)
    if not match:
        raise Refused("bad-id", f"{batch_id[:120]!r} is not a batch id "
                      "(POP/shard-N-T-S/START-END)", 400)
    pop, segment, start, end = match[1], match[2], int(match[3]), int(match[4])
    if end <= start:
        raise Refused("bad-id", f"batch {batch_id} has an empty byte range", 400)
    return pop, segment, start, end


def split_frames(data: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset in the segment, body) of each framed record; the frames must fill
    [start, end) exactly, each with its CRC. Raises Refused."""
    if len(data) != end - start:
        raise Refused("bad-range", f"the records fill {len(data)} bytes, the id says "
                      f"{end - start}")
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise Refused("bad-framing", f"a frame header is cut at byte {pos}")
        length, crc = struct.unpack_from("<II", data, pos)
        if length > MAX_RECORD or pos + 8 + length > len(data):
            raise Refused("bad-framing", f"the record at byte {pos} runs past the batch")
        body = data[pos + 8:pos + 8 + length]
        if crc32c(body) != crc:
            raise Refused("bad-crc", f"the record at byte {pos} fails its CRC-32C")
        yield start + pos, body
        pos += 8 + length


class EventStore:
    """One DuckDB file, one writer (this process). Thread-safe: writes are serialised, and
    each reader runs on a cursor of its own."""

    def __init__(self, path: Path, catalog: Catalog, read_only: bool = False) -> None:
        import duckdb  # the origin's own dependency (the `origin` extra)

        self.path = path
        self.catalog = catalog
        self.counts = Counts()
        self.lock = threading.Lock()
        try:
            self.db = duckdb.connect(str(path), read_only=read_only)
            if not read_only:
                self.db.execute(SCHEMA)
                # Every batch commits (it is acknowledged after): checkpoint the WAL into
                # the file every 256 MB of it rather than DuckDB's 16, which made a
                # checkpoint of every few commits.
                self.db.execute("SET checkpoint_threshold = '256MB'")
        except duckdb.IOException as exc:
            raise EventStoreError(
                f"cannot open the event store {path}: {str(exc).splitlines()[0]}",
                hint="another process holds it (the running origin): ask that one, with "
                     "--origin URL --token-file FILE") from exc

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def reader(self) -> Iterator[Any]:
        cursor = self.db.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    # --- intake --------------------------------------------------------------------------

    def store(self, caller: str, batch_id: str, payload: bytes,
              now: Callable[[], float] = time.time) -> Outcome:
        """Stores batch `batch_id` from PoP `caller`; raises Refused (counted)."""
        try:
            return self._store(caller, batch_id, payload, now)
        except Refused as exc:
            with self.lock:
                self.counts.refused[exc.reason] += 1
            raise

    def _store(self, caller: str, batch_id: str, payload: bytes,
               now: Callable[[], float]) -> Outcome:
        pop, segment, start, end = parse_id(batch_id)
        if pop != caller:
            raise Refused("not-your-pop", f"{caller} may send only its own events, not "
                          f"{pop}'s", 403)
        if len(payload) > MAX_BODY_BYTES:
            raise Refused("too-large", f"the batch passes {MAX_BODY_BYTES} bytes", 413)
        with self.lock:
            seen = self.db.execute("SELECT 1 FROM batches WHERE id = ?", [batch_id]).fetchall()
        if seen:
            with self.lock:
                self.counts.duplicate_batches += 1
            return Outcome(batch_id, "duplicate", 0, 0)
        if not payload:
            raise Refused("bad-compression", "the batch is empty, not a zstd frame")
        try:
            data = frames(payload, MAX_BATCH_BYTES)
        except ValueError as exc:
            raise Refused("too-large", str(exc), 413) from exc
        except zstandard.ZstdError as exc:
            raise Refused("bad-compression", f"the batch is not zstd: {exc}") from exc
        stamp = now()
        if len(data) != end - start:
            raise Refused("bad-range", f"the records fill {len(data)} bytes, the id says "
                          f"{end - start}")
        from appliance.origin import columns

        decoded = columns.decode(data, start, pop, segment) if columns.library() else \
            reference_table(pop, segment, split_frames(data, start, end))
        if isinstance(decoded, str):
            reason, _, where = decoded.partition(" at ")
            raise Refused(reason, f"the record at {where}: {REASONS[reason]}")
        table, earliest, latest = decoded
        if not table.num_rows:
            raise Refused("bad-framing", "the batch holds no record")
        now_ms = int(stamp * 1000)
        if earliest < now_ms - PAST_LIMIT_MS or latest > now_ms + FUTURE_SLACK_MS:
            raise Refused("bad-time", f"the batch holds event times from {earliest} to "
                          f"{latest} ms, too far from the origin's clock ({now_ms})")
        return self._commit(batch_id, pop, table, stamp)

    def _version(self, version: int) -> dict[str, Campaign]:
        offered = self.catalog.campaigns(version)
        if offered is None:
            raise Refused("unknown-version", f"a record names snapshot version {version}, "
                          "which this origin never published")
        return offered

    @staticmethod
    def _campaign(offered: dict[str, Campaign], version: int, campaign_id: str,
                  ad_id: str) -> Campaign:
        found = offered.get(campaign_id)
        if found is None:
            raise Refused("unknown-campaign", f"version {version} has no campaign "
                          f"{campaign_id[:64]!r}")
        if ad_id not in found.ads:
            raise Refused("unknown-ad", f"campaign {campaign_id[:64]!r} has no ad "
                          f"{ad_id[:64]!r} in version {version}")
        return found

    def _prices(self, table: Any) -> Any:
        """What the staged rows claim, checked against what their versions held: the price
        table the INSERT joins (version, campaign, advertiser, price). Raises Refused.
        Arrow's own grouping, off the store's lock: another batch commits meanwhile."""
        claimed = table.group_by(["version", "campaign", "ad", "type"]).aggregate([])
        rows: dict[tuple[int, str], tuple[str, int]] = {}
        for version, campaign_id, ad_id, kind in zip(
                *(claimed[name].to_pylist() for name in ("version", "campaign", "ad", "type")),
                strict=True):
            offered = self._version(int(version))
            if kind == ROW_TYPES[EventType.DECISION]:
                continue  # claims a version only (its ads are rows of their own)
            found = self._campaign(offered, int(version), str(campaign_id), str(ad_id))
            rows[(int(version), str(campaign_id))] = (found.advertiser, found.ecpm_micros)
        return pa.table({"version": pa.array([v for v, _ in rows], pa.uint32()),
                         "campaign": pa.array([c for _, c in rows], pa.string()),
                         "advertiser": pa.array([a for a, _ in rows.values()], pa.string()),
                         "price": pa.array([p for _, p in rows.values()], pa.uint64())})

    def _commit(self, batch_id: str, pop: str, table: Any, stamp: float) -> Outcome:
        total = int(table.num_rows)
        prices = self._prices(table)
        with self.lock:
            # Again under the lock: the same batch sent twice at once is stored once.
            if self.db.execute("SELECT 1 FROM batches WHERE id = ?", [batch_id]).fetchall():
                self.counts.duplicate_batches += 1
                return Outcome(batch_id, "duplicate", 0, 0)
            self.db.register("staged", table)
            try:
                self.db.register("prices", prices)
                self.db.execute("BEGIN")
                try:
                    inserted = int(self.db.execute(
                        INSERT, {"stamp": int(stamp * 1000), "pop": pop}).fetchall()[0][0])
                    self.db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, "
                                    "make_timestamp_ms(?))",
                                    [batch_id, pop, total, inserted, total - inserted,
                                     int(stamp * 1000)]).fetchall()
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                # The impressions' lag, bucketed by DuckDB: one row back, not one a row.
                lags = self.db.execute(LAG_QUERY, [int(stamp * 1000)]).fetchall()[0]
            finally:
                self.db.unregister("staged")
                self.db.unregister("prices")
            # Counted after the commit, so the counters never run ahead of the store.
            self.counts.batches[pop] += 1
            self.counts.events[pop] += inserted
            self.counts.duplicate_events += total - inserted
            self.counts.add_lag(lags)
        return Outcome(batch_id, "stored", inserted, total - inserted)


def open_store(state_dir: str | Path, read_only: bool = False) -> EventStore:
    """The origin's event store in its state folder, pricing from its published versions."""
    from appliance.origin.db import OriginDB

    folder = Path(state_dir)

    def payload_of(version: int) -> bytes | None:
        db = OriginDB(folder)  # a connection of this thread's own
        try:
            row = next((v for v in db.versions() if v.version == version), None)
            path = db.payload_path(row.sha256) if row is not None else None
            return path.read_bytes() if path is not None else None
        finally:
            db.close()

    return EventStore(folder / STORE_FILE, Catalog(payload_of), read_only=read_only)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(counts: Counts) -> str:
    """The intake's counters in Prometheus's text format."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    family("adpop_origin_batches_total", "counter", "Event batches stored, by PoP.",
           [(f'{{pop="{_label(p)}"}}', n) for p, n in sorted(counts.batches.items())])
    family("adpop_origin_events_total", "counter", "Event rows stored, by PoP.",
           [(f'{{pop="{_label(p)}"}}', n) for p, n in sorted(counts.events.items())])
    family("adpop_origin_duplicates_total", "counter",
           "Batches acknowledged again and records already held, not stored twice.",
           [('{kind="batch"}', counts.duplicate_batches),
            ('{kind="event"}', counts.duplicate_events)])
    family("adpop_origin_refused_total", "counter", "Event batches refused, by reason.",
           [(f'{{reason="{_label(r)}"}}', n) for r, n in sorted(counts.refused.items())])
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip((*LAG_BUCKETS, float("inf")), counts.lag_buckets, strict=True):
        cumulative += n
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        buckets.append((f'_bucket{{le="{le}"}}', cumulative))
    out.append("# HELP adpop_origin_event_lag_seconds Impression time to its commit here.")
    out.append("# TYPE adpop_origin_event_lag_seconds histogram")
    out.extend(f"adpop_origin_event_lag_seconds{suffix} {value:g}" for suffix, value in buckets)
    out.append(f"adpop_origin_event_lag_seconds_sum {counts.lag_sum:g}")
    out.append(f"adpop_origin_event_lag_seconds_count {counts.lag_count}")
    return "\n".join(out) + "\n"
