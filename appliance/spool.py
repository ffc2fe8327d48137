"""Read the engine's event spool segments (format: engine/SPOOL.md)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path


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


def _table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as the engine frames records."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


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


def _decode(body: bytes) -> Event:
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
        fields = [r.text(), r.text(), r.text(), r.u32() | r.u32() << 32]
    return Event(kind, time_ms, tuple(fields))


def read_segment(path: Path) -> Segment:
    """Every intact record of a segment; stops at a torn or corrupt tail."""
    data = path.read_bytes()
    events: list[Event] = []
    pos = 0
    while pos + 8 <= len(data):
        length, crc = struct.unpack_from("<II", data, pos)
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length or crc32c(body) != crc:
            return Segment(events, torn_tail=True)
        events.append(_decode(body))
        pos += 8 + length
    return Segment(events, torn_tail=pos != len(data))


def segments(folder: Path, closed_only: bool = True) -> Iterator[Path]:
    """Segment files in `folder`, oldest first by name (shard, open time, sequence)."""
    patterns = ["*.closed"] if closed_only else ["*.closed", "*.spool"]
    found = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    yield from found
