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

import bisect
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
from typing import Any, cast

import zstandard

from appliance.errors import AdpopError
from appliance.events.batch import frames
from appliance.snapshot.compiler import open_payload, string_table
from appliance.spool import MAX_RECORD, EventType, crc32c, decode

STORE_FILE = "events.duckdb"
MAX_BATCH_BYTES = 16 << 20  # decompressed: 16 times the shipper's default batch
MAX_BODY_BYTES = 8 << 20  # compressed, as it arrives
BATCH_ID = re.compile(r"([a-z0-9][a-z0-9._-]{0,62})/(shard-[0-9]{1,6}-[0-9]{1,12}-[0-9]{1,12})/"
                      r"([0-9]{1,15})-([0-9]{1,15})")
# Event times a PoP may claim, around the origin's clock.
FUTURE_SLACK_MS = 86_400_000
PAST_LIMIT_MS = 400 * 86_400_000
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

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
COLUMNS = ("key", "type", "time", "stored", "pop", "version", "campaign", "advertiser", "ad",
           "placement", "request_id", "request_hash", "ads", "price_micros")


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

    def lag(self, seconds: list[float]) -> None:
        for value in seconds:
            self.lag_buckets[bisect.bisect_left(LAG_BUCKETS, value)] += 1
        self.lag_sum += sum(seconds)
        self.lag_count += len(seconds)


@dataclass(frozen=True)
class Outcome:
    batch: str
    outcome: str  # "stored" or "duplicate"
    events: int  # rows stored now
    duplicates: int  # rows already held (records stored before under another batch)


def _key(*parts: bytes | str) -> int:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(struct.pack("<I", len(data)))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


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
        rows = self._rows(pop, segment, split_frames(data, start, end), stamp)
        if not rows["key"]:
            raise Refused("bad-framing", "the batch holds no record")
        return self._commit(batch_id, pop, rows, stamp)

    def _rows(self, pop: str, segment: str, records: Iterator[tuple[int, bytes]],
              stamp: float) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        now_ms = int(stamp * 1000)

        def add(key: int, kind: str, time_ms: int, version: int, campaign: str | None,
                advertiser: str | None, ad: str | None, placement: str | None,
                request_id: str | None, request_hash: int | None, ads: int | None,
                price: int | None) -> None:
            for name, value in zip(COLUMNS, (key, kind, time_ms, now_ms, pop, version,
                                             campaign, advertiser, ad, placement, request_id,
                                             request_hash, ads, price), strict=True):
                rows[name].append(value)

        for offset, body in records:
            try:
                event = decode(body)
            except (ValueError, struct.error, IndexError) as exc:
                raise Refused("bad-record", f"the record at {segment}:{offset} does not "
                              f"decode: {exc}") from exc
            if not now_ms - PAST_LIMIT_MS <= event.time_ms <= now_ms + FUTURE_SLACK_MS:
                raise Refused("bad-time", f"the record at {segment}:{offset} claims time "
                              f"{event.time_ms} ms, too far from the origin's clock")
            # The record's own name: the same wherever a batch boundary falls.
            where = _key("record", pop, segment, str(offset))
            if event.type is EventType.DECISION:
                request_id, _user, version = cast(tuple[str, str, int], event.fields[:3])
                placements = cast(tuple[tuple[str, list[tuple[str, str]]], ...],
                                  event.fields[3:])
                offered = self._version(version, segment, offset)
                served = 0
                for index, (placement, ads) in enumerate(placements):
                    for slot, (campaign_id, ad_id) in enumerate(ads):
                        found = self._campaign(offered, version, campaign_id, ad_id)
                        add(_key("served", str(where), str(index), str(slot)), "served",
                            event.time_ms, version, campaign_id, found.advertiser, ad_id,
                            placement, request_id, None, None, found.ecpm_micros)
                        served += 1
                add(where, "decision", event.time_ms, version, None, None, None, None,
                    request_id, None, min(served, 65535), None)
            else:
                campaign_id, ad_id, placement, request_hash, version = cast(
                    tuple[str, str, str, int, int], event.fields)
                found = self._campaign(self._version(version, segment, offset), version,
                                       campaign_id, ad_id)
                if event.type is EventType.IMPRESSION:
                    # One per request and ad, as the engine's dedup window counts them.
                    key = _key("impression", str(request_hash), campaign_id, ad_id, placement)
                    kind = "impression"
                else:
                    key, kind = where, "click"
                add(key, kind, event.time_ms, version, campaign_id, found.advertiser, ad_id,
                    placement, None, request_hash, None, found.ecpm_micros)
        return rows

    def _version(self, version: int, segment: str, offset: int) -> dict[str, Campaign]:
        offered = self.catalog.campaigns(version)
        if offered is None:
            raise Refused("unknown-version", f"the record at {segment}:{offset} names "
                          f"snapshot version {version}, which this origin never published")
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

    def _commit(self, batch_id: str, pop: str, rows: dict[str, list[Any]],
                stamp: float) -> Outcome:
        import pyarrow as pa  # type: ignore[import-untyped]  # no stubs published

        mask = (1 << 64) - 1
        table = pa.table({
            "key_hi": pa.array([k >> 64 for k in rows["key"]], pa.uint64()),
            "key_lo": pa.array([k & mask for k in rows["key"]], pa.uint64()),
            **{name: rows[name] for name in ("type", "pop", "campaign", "advertiser", "ad",
                                             "placement", "request_id")},
            "time": pa.array(rows["time"], pa.int64()),
            "stored": pa.array(rows["stored"], pa.int64()),
            "version": pa.array(rows["version"], pa.uint32()),
            "request_hash": pa.array(rows["request_hash"], pa.uint64()),
            "ads": pa.array(rows["ads"], pa.uint16()),
            "price_micros": pa.array(rows["price_micros"], pa.uint64()),
        })
        total = len(rows["key"])
        with self.lock:
            # Again under the lock: the same batch sent twice at once is stored once.
            if self.db.execute("SELECT 1 FROM batches WHERE id = ?", [batch_id]).fetchall():
                self.counts.duplicate_batches += 1
                return Outcome(batch_id, "duplicate", 0, 0)
            self.db.execute("BEGIN")
            try:
                self.db.register("staged", table)
                inserted = self.db.execute(
                    "INSERT INTO events SELECT (key_hi::UHUGEINT << 64) + key_lo, type, "
                    "make_timestamp_ms(time), make_timestamp_ms(stored), pop, version, "
                    "campaign, advertiser, ad, placement, request_id, request_hash, ads, "
                    "price_micros FROM staged ON CONFLICT DO NOTHING").fetchall()[0][0]
                self.db.unregister("staged")
                self.db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, "
                                "make_timestamp_ms(?))",
                                [batch_id, pop, total, inserted, total - inserted,
                                 int(stamp * 1000)]).fetchall()
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            # Counted after the commit, so the counters never run ahead of the store.
            self.counts.batches[pop] += 1
            self.counts.events[pop] += int(inserted)
            self.counts.duplicate_events += total - int(inserted)
            self.counts.lag([max(0.0, stamp - t / 1000) for t, kind
                             in zip(rows["time"], rows["type"], strict=True)
                             if kind == "impression"])
        return Outcome(batch_id, "stored", int(inserted), total - int(inserted))


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
