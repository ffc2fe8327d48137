"""The origin's C++ intake decoder (engine/src/event_columns.cpp) against the Python reference
(appliance/origin/events.py, reference_table): the same rows, keys and refusals for random
records, odd strings and damaged ones."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from appliance.origin import columns
from appliance.origin.events import reference_table, split_frames
from appliance.spool import crc32c

pytestmark = pytest.mark.unit

SEGMENT = "shard-3-1796000000-000042"
WORDS = ["camp-1", "ad-1", "slot", "", "ünïcødé", "日本語", "a/b\x1fc", "x" * 300, "emoji-😀"]


def text(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("<H", len(data)) + data


def frame(body: bytes) -> bytes:
    return struct.pack("<II", len(body), crc32c(body)) + body


def record(rng: random.Random) -> bytes:
    kind = rng.choice((1, 2, 3))
    head = bytes([kind]) + struct.pack("<Q", rng.getrandbits(41))
    if kind != 1:
        return head + b"".join(text(rng.choice(WORDS)[:255]) for _ in range(3)) + \
            struct.pack("<III", rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32))
    body = head + text(rng.choice(WORDS)) + text(rng.choice(WORDS)) + \
        struct.pack("<I", rng.getrandbits(32))
    placements = rng.randrange(0, 4)
    body += struct.pack("<I", placements)
    for _ in range(placements):
        ads = rng.randrange(0, 4)
        body += text(rng.choice(WORDS)) + struct.pack("<I", ads)
        body += b"".join(text(rng.choice(WORDS)) + text(rng.choice(WORDS)) for _ in range(ads))
    return body


def both(data: bytes, base: int = 1000) -> tuple[Any, Any]:
    native = columns.decode(data, base, "pop-a", SEGMENT)
    reference = reference_table("pop-a", SEGMENT,
                                iter(list(split_frames(data, base, base + len(data)))))
    return native, reference


def test_the_decoders_agree_on_random_records(rng: random.Random) -> None:
    assert columns.library() is not None, "`make setup` builds engine/build/libadpop_events.so"
    for _ in range(50):
        data = b"".join(frame(record(rng)) for _ in range(rng.randrange(1, 60)))
        native, reference = both(data)
        assert not isinstance(native, str) and not isinstance(reference, str)
        assert native[0].equals(reference[0]), (native[0].to_pylist()[:3],
                                                reference[0].to_pylist()[:3])
        assert native[1:] == reference[1:]


@pytest.mark.parametrize("body", [
    bytes([9]) + struct.pack("<Q", 1),  # no such type
    bytes([2]) + struct.pack("<Q", 1),  # fields missing
    bytes([2]) + struct.pack("<Q", 1) + text("c") + text("a") + text("p")
    + struct.pack("<III", 1, 2, 3) + b"!",  # a byte left over
    bytes([3]) + struct.pack("<Q", 1) + text(b"\xff\xfe") + text("a") + text("p")
    + struct.pack("<III", 1, 2, 3),  # not UTF-8
    bytes([2]) + struct.pack("<Q", 1) + text(b"\xed\xa0\x80") + text("a") + text("p")
    + struct.pack("<III", 1, 2, 3),  # a surrogate, which strict UTF-8 refuses
    bytes([2]) + struct.pack("<Q", 1) + text(b"\xc0\xaf") + text("a") + text("p")
    + struct.pack("<III", 1, 2, 3),  # an overlong form
    bytes([1]) + struct.pack("<Q", 1) + text("r") + text("u") + struct.pack("<II", 1, 5),
    b"",
], ids=["type", "short", "left-over", "not-utf8", "surrogate", "overlong", "placements",
        "empty"])
def test_the_decoders_refuse_the_same_records(body: bytes) -> None:
    good = frame(bytes([2]) + struct.pack("<Q", 5) + text("c") + text("a") + text("p")
                 + struct.pack("<III", 1, 2, 3))
    native, reference = both(good + frame(body))
    assert native == reference == f"bad-record at {SEGMENT}:{1000 + len(good)}"
