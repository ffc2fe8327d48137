"""The shipper (issue 23, step 1): the engine's spool segments to the origin, each record
stored there exactly once, and a segment deleted only once all of it is.

Each round reads every segment, oldest first, from the offset the origin has acknowledged
(the ledger), up to its last whole record: a closed segment, the one a crashed engine left
open, and the one an engine is writing now (so events reach the origin in seconds, not at
rotation). It cuts the new records into batches (appliance/events/batch.py) and sends them
through the transport, one segment's batches in order, several segments at once within
events.in_flight_bytes. An acknowledgement moves the ledger; a closed segment acknowledged to
the end of its intact records is deleted.

A failed send is retried with jittered exponential backoff; a batch the origin refuses (it
names why) is set aside in `refused/` beside the spool, logged and counted, and the
segment's later records go on: one bad batch never stops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.errors import AdpopError
from appliance.events.batch import DEFAULT_BATCH_BYTES, Batch, cut, segment_name
from appliance.events.ledger import Ledger
from appliance.spool import MAX_RECORD, scan, segments

log = logging.getLogger("adpop.shipper")

IDLE = 1.0  # seconds between rounds that found nothing new
SMALL_READ = 256 << 10  # bytes read without leaving the event loop
# How long the newest records of an open segment may wait for company before they are
# sent anyway: the lag it adds is bounded by this, the batches per second by its inverse.
LINGER = 1.0
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
RATE_WINDOW = 10.0  # seconds the shipping rate is averaged over
REFUSED = "refused"


class DeliveryError(AdpopError):
    """A batch not acknowledged: `refused` when the origin will never take it (sending it
    again cannot help), else a failure worth retrying."""

    def __init__(self, message: str, refused: bool = False, reason: str = "") -> None:
        super().__init__(message)
        self.refused = refused
        self.reason = reason


class Transport(Protocol):
    """How batches reach the origin; send returns only once the batch is durably stored
    there (or was before)."""

    description: str

    async def send(self, batch: Batch) -> None: ...
    async def close(self) -> None: ...


@dataclass
class Progress:
    """What the shipper has done, for status, the console and the benchmarks."""

    batches: int = 0
    events: int = 0
    bytes: int = 0
    failures: int = 0
    refused: int = 0
    bad_records: int = 0  # skipped for a bad CRC
    torn_tails: int = 0  # closed segments that ended in a tear
    deleted: int = 0
    last_ack: float = 0.0  # wall time
    last_error: str = ""
    retry_in: float = 0.0
    failing: bool = False  # the last round failed to deliver
    acks: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, events)

    def acked(self, events: int, size: int) -> None:
        now = time.monotonic()
        self.batches += 1
        self.events += events
        self.bytes += size
        self.last_ack = time.time()
        self.acks.append((now, events))
        while self.acks and now - self.acks[0][0] > RATE_WINDOW:
            self.acks.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        recent = sum(n for t, n in self.acks if now - t <= RATE_WINDOW)
        return recent / RATE_WINDOW


@dataclass(frozen=True)
class Backlog:
    segments: int
    bytes: int  # not yet acknowledged
    oldest_age: float  # seconds since the oldest unshipped segment was opened


class Shipper:
    def __init__(self, folder: Path, pop: str, transport: Transport,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, in_flight_bytes: int = 32 << 20) -> None:
        self.folder = folder
        self.pop = pop
        self.transport = transport
        self.batch_bytes = batch_bytes
        # Segments sent at once: each holds one batch in flight.
        self.lanes = max(1, in_flight_bytes // batch_bytes)
        self.progress = Progress()
        self.ledger: Ledger | None = None
        self.backoff = BACKOFF_FIRST
        self.backlog = Backlog(0, 0, 0.0)

    def status(self) -> dict[str, Any]:
        p = self.progress
        return {"transport": self.transport.description, "backlog_segments":
                self.backlog.segments, "backlog_bytes": self.backlog.bytes,
                "oldest_age_s": round(self.backlog.oldest_age, 1),
                "events_per_second": round(p.rate(), 1), "batches": p.batches,
                "events": p.events, "last_ack": p.last_ack, "failures": p.failures,
                "refused": p.refused, "bad_records": p.bad_records,
                "torn_tails": p.torn_tails, "deleted": p.deleted,
                "last_error": p.last_error, "retry_in_s": round(p.retry_in, 1),
                "failing": p.failing}

    async def run(self, stop: asyncio.Event) -> None:
        self.ledger = await asyncio.to_thread(Ledger, self.folder)
        try:
            while not stop.is_set():
                try:
                    more = await self.round()
                    self.backoff = BACKOFF_FIRST
                    self.progress.retry_in = 0.0
                    self.progress.failing = False
                    wait = 0.0 if more else IDLE
                except DeliveryError as exc:
                    self.progress.failures += 1
                    self.progress.failing = True
                    if exc.line() != self.progress.last_error:
                        log.warning("events not delivered: %s", exc.line())
                    self.progress.last_error = exc.line()
                    # Full jitter: a fleet that lost the origin does not come back at once.
                    wait = random.uniform(0, self.backoff)
                    self.progress.retry_in = wait
                    self.backoff = min(BACKOFF_MAX, self.backoff * 2)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await self.transport.close()

    async def round(self) -> bool:
        """One pass over the spool; whether more is waiting than it read (a backlog)."""
        # Listing and stat are a few system calls: on the loop, not worth a thread's hop.
        sizes = self._measure(list(segments(self.folder, closed_only=False)))
        lanes = asyncio.Semaphore(self.lanes)

        async def lane(path: Path, size: int) -> bool:
            async with lanes:
                return await self._segment(path, size)

        results = await asyncio.gather(*(lane(p, n) for p, n in sizes.items()),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return any(results)

    def _measure(self, paths: list[Path]) -> dict[Path, int]:
        """The backlog, and the size of each segment with something to ship (or delete)."""
        assert self.ledger is not None
        waiting = 0
        oldest = 0.0
        pending: dict[Path, int] = {}
        now = time.time()
        for path in paths:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            left = size - self.ledger.acked(segment_name(path.name))
            if left <= 0 and not path.name.endswith(".closed"):
                continue
            pending[path] = size
            waiting += max(0, left)
            opened = _opened(path.name)
            if opened and left > 0:
                oldest = max(oldest, now - opened)
        self.backlog = Backlog(sum(1 for n in pending.values() if n), waiting, oldest)
        return pending

    async def _segment(self, path: Path, size: int) -> bool:
        """Ships what is new in one segment; deletes it once closed and all acknowledged."""
        assert self.ledger is not None
        name = segment_name(path.name)
        since = self.ledger.acked(name)
        # One batch and the record that may straddle its end; room to step past a bad CRC.
        window = max(self.batch_bytes + MAX_RECORD + 8, 2 * (MAX_RECORD + 8))
        # A little new data is read on the loop; a lot (a backlog) in a thread.
        read = _read(path, since, window) if size - since < SMALL_READ else \
            await asyncio.to_thread(_read, path, since, window)
        if read is None:
            return False  # renamed (closed) or deleted since it was listed
        data, size = read
        if path.name.endswith(".spool") and len(data) < self.batch_bytes // 4 and \
                _age(data) < LINGER:
            # A segment still being written, with little new: wait for more (or for its
            # first new record to be LINGER old), so batches stay large and few.
            return False
        found = scan(data)
        for batch in cut(self.pop, name, data, found, 0, self.batch_bytes, base=since):
            await self._deliver(batch)
            await asyncio.to_thread(self.ledger.ack, name, batch.end)
        # More than one window waits (a backlog): the next round at once, not after IDLE.
        more = since + len(data) < size
        if found.records:
            # Counted once shipped past: a round that failed sends (and counts) again.
            self.progress.bad_records += found.bad
        if path.name.endswith(".closed") and since + len(data) >= size:
            # All of a closed segment was read: what follows its whole records is a tear.
            torn = len(data) - found.end
            if torn:
                self.progress.torn_tails += 1
                log.warning("segment %s ends in %d bytes that are no whole record (the "
                            "machine stopped mid-write); shipped what came before",
                            path.name, torn)
            if await asyncio.to_thread(self.ledger.retire, path, since + found.end):
                self.progress.deleted += 1
        return more

    async def _deliver(self, batch: Batch) -> None:
        try:
            await self.transport.send(batch)
        except DeliveryError as exc:
            if not exc.refused:
                raise
            # Kept for an operator to look at; the segment's later records go on.
            self.progress.refused += 1
            await asyncio.to_thread(self._set_aside, batch, exc)
            log.error("the origin refused batch %s (%s): %s; set aside in %s",
                      batch.id, exc.reason, exc.message, self.folder / REFUSED)
            return
        self.progress.acked(batch.records, len(batch.payload))

    def _set_aside(self, batch: Batch, exc: DeliveryError) -> None:
        folder = self.folder / REFUSED
        folder.mkdir(exist_ok=True)
        stem = batch.id.replace("/", "_")
        (folder / f"{stem}.zst").write_bytes(batch.payload)
        (folder / f"{stem}.why").write_text(f"{exc.reason}: {exc.message}\n")


def _read(path: Path, since: int, window: int) -> tuple[bytes, int] | None:
    """Up to `window` bytes of `path` from `since`, and the file's size then."""
    try:
        with open(path, "rb") as segment:
            size = segment.seek(0, 2)
            segment.seek(since)
            return segment.read(window), size
    except FileNotFoundError:
        return None


def _age(data: bytes) -> float:
    """Seconds since the first record in `data` was written (its time field, engine/SPOOL.md);
    0 when there is no whole header to read."""
    if len(data) < 17:
        return 0.0
    (time_ms,) = struct.unpack_from("<Q", data, 9)
    return float(time.time() - time_ms / 1000)


def _opened(file_name: str) -> float:
    """The open time in a segment's name (shard-N-TIME-SEQ), 0 when it has none."""
    parts = segment_name(file_name).split("-")
    return float(parts[2]) if len(parts) == 4 and parts[2].isdigit() else 0.0
