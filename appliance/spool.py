"""Read the engine's event spool segments (format: engine/SPOOL.md)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import google_crc32c


@dataclass(frozen=True)
class Backlog:
    """The closed segments waiting in a spool folder."""

    segments: int
    size: int


def backlog(folder: Path) -> Backlog:
    """Closed segments and their bytes; a segment deleted while counted is skipped."""
    segments = size = 0
    if folder.is_dir():
        for path in folder.glob("*.closed"):
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                continue
            segments += 1
    return Backlog(segments, size)


# The largest record a reader believes: the engine's decision records are bounded well
# below it (placements and ads per request are capped). A length past it is a tear.
MAX_RECORD = 1 << 20


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as the engine frames records: google-crc32c's C code (about
    18 GB/s here), so a reader keeps up with the engine."""
    return int(google_crc32c.extend(crc, bytes(data)))


@dataclass(frozen=True)
class Scan:
    """Where a segment's intact records are."""

    records: list[tuple[int, int]]  # (start, end) of each intact record, frame included
    end: int  # where the whole records end: what follows is a tear, or nothing
    bad: int  # records skipped for a bad CRC, where the framing after them held
    torn: bool  # bytes after `end` that are no whole record (a machine died mid-write)


def _frame(data: bytes | memoryview, pos: int) -> tuple[int, int] | None:
    """(end, crc) of the record framed at `pos`, when its length fits the data."""
    if pos + 8 > len(data):
        return None
    length, crc = struct.unpack_from("<II", data, pos)
    end = pos + 8 + length
    return (end, crc) if length <= MAX_RECORD and end <= len(data) else None


def _intact(data: bytes | memoryview, pos: int) -> bool:
    frame = _frame(data, pos)
    return frame is not None and crc32c(data[pos + 8:frame[0]]) == frame[1]


def scan(data: bytes | memoryview) -> Scan:
    """The intact records of a segment. A record with a bad CRC is skipped (and counted)
    when the record after it checks: its length was right, only its bytes were damaged.
    Otherwise the framing cannot be trusted past it, and the scan ends there, as at a
    length that runs past the end."""
    # The shipper's inner loop, once per record at the engine's rate: names bound locally,
    # one unpack and one C CRC call per record.
    data = bytes(data)
    unpack, value, size = _FRAME.unpack_from, google_crc32c.value, len(data)
    records: list[tuple[int, int]] = []
    append = records.append
    bad = pos = 0
    while pos + 8 <= size:
        length, crc = unpack(data, pos)
        end = pos + 8 + length
        if length > MAX_RECORD or end > size:
            break
        if value(data[pos + 8:end]) == crc:
            append((pos, end))
        elif end < size and _intact(data, end):
            bad += 1
        else:
            break
        pos = end
    return Scan(records, pos, bad, torn=pos != size)


_FRAME = struct.Struct("<II")


class EventType(IntEnum):
    DECISION = 1
    IMPRESSION = 2
    CLICK = 3


@dataclass(frozen=True)
class Event:
    type: EventType
    time_ms: int
    fields: tuple[object, ...]


@dataclass(frozen=True)
class Segment:
    events: list[Event]
    torn_tail: bool  # bytes after the last good record (a crash mid-write)
    bad: int = 0  # records skipped for a bad CRC


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u8(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u32(self) -> int:
        (value,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        return int(value)

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return int(value)

    def text(self) -> str:
        (n,) = struct.unpack_from("<H", self.data, self.pos)
        self.pos += 2
        value = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return value


def decode(body: bytes) -> Event:
    """One record's body; raises ValueError, struct.error or IndexError when it is not one
    (bytes left over included)."""
    r = _Reader(body)
    kind = EventType(r.u8())
    time_ms = r.u64()
    fields: list[object]
    if kind is EventType.DECISION:
        fields = [r.text(), r.text(), r.u32()]
        for _ in range(r.u32()):
            placement = r.text()
            ads = [(r.text(), r.text()) for _ in range(r.u32())]
            fields.append((placement, ads))
    else:
        fields = [r.text(), r.text(), r.text(), r.u32() | r.u32() << 32, r.u32()]
    if r.pos != len(body):
        raise ValueError(f"{len(body) - r.pos} bytes after the fields of a {kind.name.lower()}")
    return Event(kind, time_ms, tuple(fields))



def read_segment(path: Path) -> Segment:
    """Every intact record of a segment (see scan)."""
    data = path.read_bytes()
    found = scan(data)
    return Segment([decode(data[start + 8:end]) for start, end in found.records],
                   torn_tail=found.torn, bad=found.bad)


def segments(folder: Path, closed_only: bool = True) -> Iterator[Path]:
    """Segment files in `folder`, oldest first by name (shard, open time, sequence)."""
    patterns = ["*.closed"] if closed_only else ["*.closed", "*.spool"]
    found = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    yield from found
