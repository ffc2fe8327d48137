"""Reading spool segments for shipping (issue 23, step 1): intact records only, a bad CRC
skipped where the framing holds, a tear never passed; batches with stable ids."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import zstandard

from appliance.events.batch import cut, frames, segment_name
from appliance.spool import MAX_RECORD, crc32c, scan

pytestmark = pytest.mark.unit


def record(body: bytes) -> bytes:
    return struct.pack("<II", len(body), crc32c(body)) + body


def impression(n: int) -> bytes:
    text = b"".join(struct.pack("<H", len(s)) + s for s in (b"camp-1", b"ad-1", b"top"))
    return record(struct.pack("<BQ", 2, 1_780_000_000_000 + n) + text + struct.pack("<II", n, 0))


def test_crc32c_is_castagnoli_and_chains() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")


def test_whole_records_are_found_and_a_torn_tail_is_never_passed() -> None:
    data = b"".join(impression(n) for n in range(5))
    whole = scan(data)
    assert len(whole.records) == 5 and whole.end == len(data) and not whole.torn
    for cut_at in (1, 7, 8, len(impression(0)) - 1):
        torn = scan(data + impression(5)[:cut_at])
        assert len(torn.records) == 5 and torn.end == len(data) and torn.torn
    huge = data + struct.pack("<II", MAX_RECORD + 1, 0)
    assert scan(huge).end == len(data) and scan(huge).torn


def test_a_bad_crc_is_skipped_where_the_framing_holds_and_ends_the_scan_where_not() -> None:
    records = [impression(n) for n in range(4)]
    damaged = bytearray(records[1])
    damaged[-1] ^= 0xFF
    data = records[0] + bytes(damaged) + records[2] + records[3]
    found = scan(data)
    assert found.bad == 1 and len(found.records) == 3 and not found.torn
    # The last record damaged: nothing after it vouches for its length; the scan stops.
    last = records[0] + bytes(damaged)
    assert scan(last).records == [(0, len(records[0]))] and scan(last).torn
    # A damaged length: the record after it does not check either; a tear.
    wrong = bytearray(records[1])
    wrong[0] ^= 0x01
    stopped = scan(records[0] + bytes(wrong) + records[2])
    assert len(stopped.records) == 1 and stopped.torn


def test_batches_have_stable_ids_and_carry_the_intact_frames() -> None:
    records = [impression(n) for n in range(10)]
    data = b"".join(records)
    size = len(records[0])
    batches = list(cut("pop-1", "shard-0-1780000000-1", data, scan(data),
                       max_bytes=3 * size))
    assert [b.records for b in batches] == [3, 3, 3, 1]
    assert batches[0].id == f"pop-1/shard-0-1780000000-1/0-{3 * size}"
    assert [b.id for b in cut("pop-1", "shard-0-1780000000-1", data, scan(data),
                              max_bytes=3 * size)] == [b.id for b in batches]
    assert b"".join(frames(b.payload, 1 << 20) for b in batches) == data
    # From an acknowledged offset on: the rest only, ids unchanged.
    rest = list(cut("pop-1", "s", data, scan(data), since=6 * size, max_bytes=3 * size))
    assert [(b.start, b.end) for b in rest] == [(6 * size, 9 * size), (9 * size, 10 * size)]
    assert segment_name("shard-0-1-2.closed") == segment_name("shard-0-1-2.spool") == \
        "shard-0-1-2"


def test_a_batch_that_inflates_past_the_limit_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (4 << 20))
    with pytest.raises(ValueError, match="decompresses past"):
        frames(bomb, 1 << 20)
    with pytest.raises(zstandard.ZstdError):
        frames(b"not zstd at all", 1 << 20)


def test_the_ledger_resumes_where_it_was_acked_and_deletes_only_what_is_acked(
        tmp_path: Path) -> None:
    from appliance.events.ledger import Ledger

    data = b"".join(impression(n) for n in range(4))
    closed = tmp_path / "shard-0-1780000000-1.closed"
    closed.write_bytes(data)
    open_one = tmp_path / "shard-1-1780000000-1.spool"
    open_one.write_bytes(data)
    ledger = Ledger(tmp_path)
    name = segment_name(closed.name)
    assert ledger.acked(name) == 0
    half = scan(data).records[1][1]
    ledger.ack(name, half)
    ledger.ack(name, 1)  # never moves back
    assert Ledger(tmp_path).acked(name) == half, "a new ledger reads it back"
    assert not ledger.retire(closed, scan(data).end) and closed.exists()
    ledger.ack(name, scan(data).end)
    assert not ledger.retire(open_one, scan(data).end), "an open segment is never deleted"
    assert ledger.retire(closed, scan(data).end) and not closed.exists()
    assert Ledger(tmp_path).offsets == {}
    # An entry whose segment is gone (a crash between delete and write) is dropped.
    (tmp_path / "shipped.json").write_text('{"gone": 5, "shard-1-1780000000-1": 9}')
    assert Ledger(tmp_path).offsets == {"shard-1-1780000000-1": 9}
    # An unreadable one (a power loss: it is not synced) starts over: sending again is safe.
    (tmp_path / "shipped.json").write_text("[1, 2]")
    assert Ledger(tmp_path).offsets == {}
    (tmp_path / "shipped.json").write_text('{"shard-1-1780')
    assert Ledger(tmp_path).offsets == {}
