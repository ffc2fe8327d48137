"""Backpressure without loss (issue 23, step 4), on the real engine with its spool on a small
tmpfs that this test mounts: once the spool has no room the engine answers no-fill with
reason spool_full, still records the pixels of ads it served (in the headroom), never answers
a request whose record it did not write, and serves again by itself once segments are
shipped (deleted) away. Segments a killed engine left open are closed at its next start."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.model import CampaignSet, parse_documents
from appliance.spool import EventType, read_segment, segments
from tests.engine_harness import RunningEngine, running_engine

pytestmark = pytest.mark.integration

TMPFS_BYTES = 1 << 20  # what the issue measured the engine on


def request(n: int) -> dict[str, Any]:
    return {"id": f"full-{n}", "placements": [{"id": "home-side", "count": 2}],
            "geo": {"country": "US"}, "device": {"type": "desktop"}, "time": 1770000000,
            "user": {"key": f"user-{n}"}}


@pytest.fixture(scope="module")
def campaign_set() -> CampaignSet:
    from appliance.snapshot import synth

    return parse_documents(synth.generate(1500, seed=41))


@pytest.fixture()
def small_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(spool)],
                   check=True)
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def logged(engine: RunningEngine, text: str) -> None:
    """Waits for `text` in the engine's log: the admin thread looks every 100 ms."""
    deadline = time.monotonic() + 10
    while text not in engine.log.read_text():
        assert time.monotonic() < deadline, f"the engine never logged {text!r}"
        time.sleep(0.05)


def records(folder: Path) -> dict[EventType, int]:
    counts = dict.fromkeys(EventType, 0)
    for path in segments(folder, closed_only=False):
        segment = read_segment(path)
        assert segment.bad == 0, path
        for event in segment.events:
            counts[event.type] += 1
    return counts


def fire(engine: RunningEngine, n: int) -> tuple[str, list[str]]:
    """One decision; ("ads" | "spool_full" | "no_fill", its impression URLs)."""
    code, answer = engine.post("/v1/decide", request(n))
    assert code == 200, answer
    ads = [ad for p in answer["placements"] for ad in p["ads"]]
    if answer.get("no_fill") == "spool_full":
        assert not ads
        return "spool_full", []
    return ("ads" if ads else "no_fill"), [ad["imp"] for ad in ads]


def test_a_full_spool_sheds_with_spool_full_and_loses_no_acknowledged_event(
        tmp_path: Path, small_spool: Path, campaign_set: CampaignSet,
        signing_key: SigningKey) -> None:
    with running_engine(tmp_path, campaign_set, signing_key, shards=1,
                        extra=["--spool-segment-bytes", "65536",
                               "--spool-headroom-bytes", "65536"]) as engine:
        answered = {"ads": 0, "spool_full": 0, "no_fill": 0}
        waiting: list[str] = []  # impression URLs of ads served, fired later
        pixels_ok = pixels_refused = 0
        n = 0
        # Until the spool is full: bounded by count, as every load here is.
        while answered["spool_full"] < 50 and n < 20_000:
            n += 1
            outcome, imps = fire(engine, n)
            answered[outcome] += 1
            waiting.extend(imps)
            # Half the pixels now, half once the spool is full.
            while len(waiting) > 40:
                code = engine.get(waiting.pop(0))[0]
                assert code in (204, 503)
                pixels_ok += code == 204
                pixels_refused += code == 503
        assert answered["spool_full"] == 50, answered
        status = engine.status()
        assert status["spool"]["shedding"] == 1
        assert status["spool"]["full_no_fill"] >= 50
        assert status["spool"]["write_errors"] == 0
        # The ads served before the spool filled still get their impressions recorded.
        for url in waiting:
            code = engine.get(url)[0]
            assert code in (204, 503)
            pixels_ok += code == 204
            pixels_refused += code == 503
        assert pixels_refused == 0, "the headroom should hold the pixels of served ads"
        code, metrics = engine.get("/metrics", port=engine.metrics_port)
        assert b'adpop_spool_full_total{answer="no_fill"}' in metrics
        logged(engine, "spool full")
        # Every acknowledged event is in the spool, none torn, nothing more.
        held = records(small_spool)
        assert held[EventType.IMPRESSION] == pixels_ok == engine.status()["events"]["impressions"]
        assert held[EventType.DECISION] == answered["ads"] + answered["no_fill"]

        # Shipping makes room: the closed segments go, and the engine serves again.
        for path in small_spool.glob("*.closed"):
            path.unlink()
        deadline = time.monotonic() + 10
        while fire(engine, n + 1)[0] == "spool_full":
            n += 1
            assert time.monotonic() < deadline, "the engine did not serve again"
            time.sleep(0.1)
        logged(engine, "room again")
        # The impressions and decisions written after the space came back are readable.
        assert records(small_spool)[EventType.DECISION] >= 1

        # A killed engine leaves its open segment: the next start closes it, whole records
        # kept, and counts it in the backlog.
        before = records(small_spool)
        os.kill(engine.process.pid, signal.SIGKILL)
        engine.process.wait()
        assert list(small_spool.glob("*.spool"))
    with running_engine(tmp_path, campaign_set, signing_key, shards=1) as again:
        assert not list(small_spool.glob("*.spool"))
        assert records(small_spool) == before
        spool = again.status()["spool"]
        assert spool["leftovers_closed"] >= 1 and spool["backlog_bytes"] > 0
        logged(again, "left open")


def test_a_failed_write_answers_nothing_and_leaves_no_tear(
        tmp_path: Path, campaign_set: CampaignSet, signing_key: SigningKey) -> None:
    """A spool folder on a file system without room for even the reservation (full from
    the start): decisions shed, pixels are refused with 503, and nothing is acknowledged."""
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(spool)], check=True)
    try:
        with running_engine(tmp_path, campaign_set, signing_key, shards=1) as engine:
            code, answer = engine.post("/v1/decide", request(1))
            assert code == 200 and answer["no_fill"] == "spool_full"
            conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=5)
            conn.request("GET", "/v1/e/imp?t=" + "A" * 40)
            assert conn.getresponse().status == 403  # a forged token is still a 403 first
            conn.close()
            assert engine.status()["spool"]["write_errors"] == 0
            assert records(spool) == dict.fromkeys(EventType, 0)
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_a_full_spool_folder_does_not_stop_the_shipper_emptying_it(tmp_path: Path) -> None:
    """The ledger cannot be written on a full file system: the shipper goes on (the offsets
    held in memory), deletes what the origin holds, and the ledger is written once there is
    room again."""
    from appliance.events.batch import segment_name
    from appliance.events.ledger import Ledger

    folder = tmp_path / "spool"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                   check=True)
    try:
        closed = folder / "shard-0-1796000000-000001.closed"
        closed.write_bytes(b"\0" * 8192)
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:  # until the file system is full
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        ledger = Ledger(folder)
        ledger.ack(segment_name(closed.name), 8192)  # cannot be written: no exception
        assert ledger.unwritten and ledger.acked(segment_name(closed.name)) == 8192
        assert ledger.retire(closed, 8192) and not closed.exists()
        assert not ledger.unwritten, "written once deleting the segment made room"
        assert Ledger(folder).offsets == {}
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
