"""The shipper (issue 23, step 1) against the real origin over mutual TLS: closed and open
segments shipped, a closed one deleted only once all of it is stored, a bad CRC skipped and
counted with the rest shipped, a torn tail stopped at, a refused batch set aside without
stopping the rest, and an origin that is away retried with backoff."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import pytest

from appliance.events.shipper import REFUSED, Shipper
from appliance.events.transport import HttpTransport
from appliance.origin import reports
from appliance.snapshot import synth
from appliance.snapshot.model import parse_documents
from appliance.spool import crc32c
from tests.test_origin_tls import Tls, origin_over_tls, publish

pytestmark = pytest.mark.integration


def text(value: str) -> bytes:
    return struct.pack("<H", len(value)) + value.encode()


def impression(campaign: str, ad: str, n: int, version: int = 1) -> bytes:
    body = (bytes([2]) + struct.pack("<Q", int(time.time() * 1000)) + text(campaign)
            + text(ad) + text("slot") + struct.pack("<III", n, 0, version))
    return struct.pack("<II", len(body), crc32c(body)) + body


def impressions(tls: Tls) -> int:
    assert tls.origin.events is not None
    with tls.origin.events.reader() as cursor:
        return sum(r["impressions"] for r in reports.report(cursor, "pop"))


async def until(what: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_segments_ship_once_and_go_only_when_all_of_them_is_stored(tmp_path: Path) -> None:
    camp = parse_documents(synth.generate(20, seed=1)).campaigns[0]
    ad = camp.ads[0].id

    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            publish(tls, 1)
            spool = tmp_path / "spool"
            spool.mkdir()
            # A closed segment with a damaged record in the middle.
            records = [impression(camp.id, ad, n) for n in range(100)]
            damaged = bytearray(records[50])
            damaged[-1] ^= 0xFF
            records[50] = bytes(damaged)
            (spool / "shard-0-1796000000-000001.closed").write_bytes(b"".join(records))
            # One closed after the machine stopped mid-write: a torn tail.
            torn = b"".join(impression(camp.id, ad, n) for n in range(100, 150))
            (spool / "shard-1-1796000000-000001.closed").write_bytes(torn + torn[:30])
            # One still open (an engine writes it): shipped, never deleted.
            live = spool / "shard-0-1796000100-000002.spool"
            live.write_bytes(b"".join(impression(camp.id, ad, n) for n in range(150, 160)))
            # A record of a campaign the origin never published: refused, set aside.
            (spool / "shard-2-1796000000-000001.closed").write_bytes(
                impression("camp-forged", ad, 999))

            shipper = Shipper(spool, "pop-a", HttpTransport(tls.url, "pop-a",
                                                            tls.client("pop-a")),
                              batch_bytes=1024)
            stop = asyncio.Event()
            task = asyncio.create_task(shipper.run(stop))
            await until("all shipped", lambda: impressions(tls) == 159)
            await until("closed segments deleted", lambda: not list(spool.glob("*.closed")))
            assert live.exists()
            progress = shipper.progress
            assert progress.bad_records == 1 and progress.torn_tails == 1
            assert progress.refused == 1 and progress.deleted == 3
            assert next(iter((spool / REFUSED).glob("*.why"))).read_text().startswith(
                "unknown-campaign")
            # More written to the open segment arrives too, and it goes once closed.
            with open(live, "ab") as out:
                out.write(impression(camp.id, ad, 160))
            await until("the appended record", lambda: impressions(tls) == 160)
            live.rename(live.with_suffix(".closed"))
            await until("the last segment deleted", lambda: not list(spool.glob("*.closed")))
            assert impressions(tls) == 160
            status = shipper.status()
            assert status["backlog_bytes"] == 0 and status["failures"] == 0
            stop.set()
            await task
            assert (spool / "shipped.json").read_text() == "{}"

    asyncio.run(scenario())


def test_an_origin_away_is_retried_with_backoff_and_nothing_is_lost(tmp_path: Path) -> None:
    camp = parse_documents(synth.generate(20, seed=1)).campaigns[0]
    ad = camp.ads[0].id
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "shard-0-1796000000-000001.closed").write_bytes(
        b"".join(impression(camp.id, ad, n) for n in range(40)))

    async def scenario() -> None:
        # Nothing listens on the origin's port yet.
        from appliance.up import free_port

        shipper = Shipper(spool, "pop-a", HttpTransport(f"https://127.0.0.1:{free_port()}",
                                                        "pop-a", None))
        stop = asyncio.Event()
        task = asyncio.create_task(shipper.run(stop))
        await until("failures", lambda: shipper.progress.failures >= 3)
        assert shipper.status()["retry_in_s"] >= 0 and shipper.progress.last_error
        assert list(spool.glob("*.closed")), "nothing may go before it is stored"
        stop.set()
        await task
        async with origin_over_tls(tmp_path) as tls:
            publish(tls, 1)
            again = Shipper(spool, "pop-a", HttpTransport(tls.url, "pop-a",
                                                          tls.client("pop-a")))
            stop = asyncio.Event()
            task = asyncio.create_task(again.run(stop))
            await until("all shipped", lambda: impressions(tls) == 40)
            await until("deleted", lambda: not list(spool.glob("*.closed")))
            stop.set()
            await task

    asyncio.run(scenario())
