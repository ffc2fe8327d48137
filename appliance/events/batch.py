"""Batches of spool records as the shipper sends them (issue 23, step 1).

A batch is a run of whole, intact records of one segment, cut greedily up to a size, and
compressed with zstd. Its id names where its records came from: PoP id, segment name and
the byte range [start, end) in the segment. Cut from the same offset with the same size, a
segment always gives the same batches, so a batch sent again after a crash has the id it
had: the origin acknowledges it again without storing it twice. A batch never spans a
record that failed its CRC (the scan counted it): its frames fill [start, end) exactly, so
the receiver knows each record's offset, which names the record for good.

Payload: the records' frames (u32 length, u32 CRC-32C, body) one after the other, as in
the segment; the receiver checks each CRC again.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from appliance.spool import Scan

BATCH_HEADER = "Adpop-Batch"  # the batch id, on POST /v1/events and as the NATS message id
POP_HEADER = "Adpop-Pop"  # who sends, only where no certificate says it (TLS off, loopback)
ZSTD_LEVEL = 1  # about 7x on spool records, at twice level 3's speed for the same size
# A backlog drains in batches this large: the origin then writes each batch's rows straight
# into its file (DuckDB's bulk path) instead of through its log, about twice the rate.
DEFAULT_BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class Batch:
    pop: str
    segment: str  # the segment's name without its .spool/.closed suffix: stable as it closes
    start: int
    end: int
    records: int
    payload: bytes  # zstd of the records' frames

    @property
    def id(self) -> str:
        return f"{self.pop}/{self.segment}/{self.start}-{self.end}"


def segment_name(file_name: str) -> str:
    """A segment's name without the suffix its state adds (.spool while open, .closed)."""
    for suffix in (".closed", ".spool"):
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def cut(pop: str, segment: str, data: bytes | memoryview, found: Scan, since: int = 0,
        max_bytes: int = DEFAULT_BATCH_BYTES, base: int = 0) -> Iterator[Batch]:
    """The batches of the intact records at or after offset `since` (what was acknowledged
    before), each at most `max_bytes` of frames unless one record alone is larger. `data`
    starts at offset `base` of the segment (a window of it): ids carry segment offsets."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    # Once per record at the engine's rate: a run is its first start, its end and a count.
    first = last = count = 0
    for start, end in found.records:
        if start < since:
            continue
        if count and (start != last or end - first > max_bytes):
            yield _batch(pop, segment, data, first, last, count, compressor, base)
            count = 0
        if not count:
            first = start
        last = end
        count += 1
    if count:
        yield _batch(pop, segment, data, first, last, count, compressor, base)


def _batch(pop: str, segment: str, data: bytes | memoryview, first: int, last: int,
           count: int, compressor: zstandard.ZstdCompressor, base: int) -> Batch:
    # A run is contiguous (cut starts another at a gap): one slice holds its frames.
    return Batch(pop, segment, base + first, base + last, count,
                 compressor.compress(bytes(data[first:last])))


def frames(payload: bytes, max_bytes: int) -> bytes:
    """A batch's frames, decompressed to at most `max_bytes` (a zip bomb stops there);
    raises zstandard.ZstdError or ValueError."""
    # Read through a stream, one byte past the limit at most: the size a frame claims is
    # not believed, and nothing larger is ever held.
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as reader:
        data = reader.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"a batch decompresses past {max_bytes} bytes")
    return data
