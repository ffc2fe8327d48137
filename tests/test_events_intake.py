"""The origin's event intake (issue 23, step 2) over real mutual TLS: batches from the real
shipper's transport stored once, priced at the serving version's eCPM, and a corpus of
hostile batches each refused with a named reason (or acknowledged as a duplicate) without
changing a report."""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard
from aiohttp import ClientConnectionError, ClientSession

from appliance.events.batch import BATCH_HEADER, cut
from appliance.events.transport import HttpTransport
from appliance.origin import enroll, reports
from appliance.origin.events import MAX_BODY_BYTES
from appliance.snapshot import synth
from appliance.snapshot.model import parse_documents
from appliance.spool import crc32c, scan
from tests.test_origin_tls import Tls, origin_over_tls, publish

pytestmark = pytest.mark.integration

SEGMENT = "shard-0-1796000000-000001"


def text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<H", len(data)) + data


def frame(body: bytes) -> bytes:
    return struct.pack("<II", len(body), crc32c(body)) + body


def decision(request_id: str, version: int, ads: list[tuple[str, str]],
             time_ms: int | None = None) -> bytes:
    body = bytes([1]) + struct.pack("<Q", time_ms or int(time.time() * 1000))
    body += text(request_id) + text("user-1") + struct.pack("<II", version, 1)
    body += text("slot-1") + struct.pack("<I", len(ads))
    for campaign, ad in ads:
        body += text(campaign) + text(ad)
    return body


def pixel(kind: int, campaign: str, ad: str, request_hash: int, version: int,
          time_ms: int | None = None) -> bytes:
    return (bytes([kind]) + struct.pack("<Q", time_ms or int(time.time() * 1000))
            + text(campaign) + text(ad) + text("slot-1")
            + struct.pack("<III", request_hash & 0xFFFFFFFF, request_hash >> 32, version))


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def batch_of(pop: str, records: list[bytes], start: int = 0,
             segment: str = SEGMENT) -> tuple[str, bytes]:
    data = b"".join(frame(r) for r in records)
    return f"{pop}/{segment}/{start}-{start + len(data)}", zstd(data)


def report(tls: Tls, by: str = "pop") -> list[dict[str, Any]]:
    assert tls.origin.events is not None
    with tls.origin.events.reader() as cursor:
        return reports.report(cursor, by)


def rows(tls: Tls) -> int:
    assert tls.origin.events is not None
    with tls.origin.events.reader() as cursor:
        return int(cursor.execute("SELECT count(*) FROM events").fetchall()[0][0])


async def post(tls: Tls, ctx: ssl.SSLContext, batch_id: str | None, body: bytes
               ) -> tuple[int, dict[str, Any]]:
    headers = {BATCH_HEADER: batch_id} if batch_id is not None else {}
    async with ClientSession() as s, \
            s.post(f"{tls.url}/v1/events", data=body, headers=headers, ssl=ctx) as resp:
        return resp.status, await resp.json(content_type=None)


def test_batches_are_stored_once_priced_and_hostile_ones_refused_by_name(
        tmp_path: Path) -> None:
    campaigns = parse_documents(synth.generate(20, seed=1)).campaigns
    first, second = campaigns[0], campaigns[1]
    ad1, ad2 = first.ads[0].id, second.ads[0].id

    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            publish(tls, 1)
            honest = tls.client("pop-a")
            eu = tls.client("pop-eu", "eu")
            revoked = tls.client("pop-r")
            async with ClientSession() as s:
                for ctx, pop in ((honest, "pop-a"), (revoked, "pop-r"), (eu, "pop-eu")):
                    resp = await s.post(f"{tls.url}/v1/pops/{pop}/register", json={},
                                        ssl=ctx)
                    assert resp.status == 200
            enroll.revoke(tls.db, "pop-r")

            # The real transport, from a real spool segment's bytes.
            records = [decision("req-1", 1, [(first.id, ad1)]),
                       pixel(2, first.id, ad1, 0x1122334455667788, 1),
                       pixel(3, first.id, ad1, 0x1122334455667788, 1),
                       decision("req-2", 1, []),
                       decision("req-3", 1, [(second.id, ad2)]),
                       pixel(2, second.id, ad2, 42, 1)]
            data = b"".join(frame(r) for r in records)
            transport = HttpTransport(tls.url, "pop-a", honest)
            batches = list(cut("pop-a", SEGMENT, data, scan(data), max_bytes=120))
            assert len(batches) > 1
            for b in batches:
                await transport.send(b)
            for b in batches:  # all again, as after a crash before the ledger moved
                await transport.send(b)
            # Cut again in other places (another batch size): the same records, not stored.
            for b in cut("pop-a", SEGMENT, data, scan(data), max_bytes=1 << 20):
                await transport.send(b)
            await transport.close()
            assert rows(tls) == 8  # 3 decisions, 2 ads served, 2 impressions, 1 click
            got = report(tls)
            assert got == [{"key": "pop-a", "requests": 3, "with_ads": 2, "no_fill": 1,
                            "impressions": 2, "clicks": 1, "ctr": 0.5,
                            "spend": round((first.ecpm_micros + second.ecpm_micros) / 1e9, 6),
                            "fill_rate": round(2 / 3, 6)}]
            by_campaign = {r["key"]: r for r in report(tls, "campaign")}
            assert by_campaign[first.id]["impressions"] == 1
            assert by_campaign[first.id]["spend"] == round(first.ecpm_micros / 1e9, 6)

            before, count = report(tls), rows(tls)
            corpus = hostile(tls, first.id, ad1, second.id, ad2, honest, eu, revoked)
            assert len(corpus) >= 30
            for name, (ctx, batch_id, body, expected) in corpus.items():
                try:
                    status, answer = await post(tls, ctx, batch_id, body)
                except (ClientConnectionError, ssl.SSLError) as exc:
                    assert expected == "tls", f"{name}: {exc!r}"
                    continue
                if expected == "duplicate":
                    assert status == 200 and answer["events"] == 0, f"{name}: {answer}"
                    continue
                assert 400 <= status < 500, f"{name}: {status} {answer}"
                assert answer["error"]["code"] == expected, f"{name}: {answer}"
            assert report(tls) == before and rows(tls) == count
            async with ClientSession() as s, s.get(f"{tls.url}/metrics", ssl=honest) as resp:
                metrics = await resp.text()
            for reason in ("bad-id", "bad-crc", "unknown-campaign", "unknown-version",
                           "too-large", "not-your-pop", "bad-time"):
                assert f'adpop_origin_refused_total{{reason="{reason}"}}' in metrics

    asyncio.run(scenario())


def hostile(tls: Tls, camp: str, ad: str, camp2: str, ad2: str, honest: ssl.SSLContext,
            eu: ssl.SSLContext, revoked: ssl.SSLContext
            ) -> dict[str, tuple[ssl.SSLContext, str | None, bytes, str]]:
    """name -> (client, batch id, body, the refusal's code, or "duplicate" or "tls")."""
    now = int(time.time() * 1000)
    good = [decision("req-h", 1, [(camp, ad)]), pixel(2, camp, ad, 7, 1)]
    good_id, good_body = batch_of("pop-a", good, start=10_000)
    one = frame(pixel(2, camp, ad, 8, 1))

    def raw(data: bytes, start: int = 20_000) -> tuple[str, bytes]:
        return f"pop-a/{SEGMENT}/{start}-{start + len(data)}", zstd(data)

    bad_crc = bytearray(one)
    bad_crc[-1] ^= 0xFF
    stranger = ssl.create_default_context(cadata=tls.authority.pem().decode())
    cases: dict[str, tuple[ssl.SSLContext, str | None, bytes, str]] = {
        "no batch id": (honest, None, good_body, "bad-id"),
        "an empty batch id": (honest, "", good_body, "bad-id"),
        "another PoP's id in the batch id": (honest, batch_of("pop-b", good)[0], good_body,
                                             "not-your-pop"),
        "pop-eu sending pop-a's batch": (eu, good_id, good_body, "not-your-pop"),
        "a batch id that is no id": (honest, "pop-a/../../etc/passwd", good_body, "bad-id"),
        "an empty byte range": (honest, f"pop-a/{SEGMENT}/5-5", good_body, "bad-id"),
        "a backwards byte range": (honest, f"pop-a/{SEGMENT}/9-5", good_body, "bad-id"),
        "a 4,000-character batch id": (honest, "pop-a/" + "x" * 4000, good_body, "bad-id"),
        "a segment name that is no segment": (honest, "pop-a/segment/0-10", good_body,
                                              "bad-id"),
        "not zstd": (honest, raw(one)[0], b"plain bytes, not compressed", "bad-compression"),
        "an empty body": (honest, raw(one)[0], b"", "bad-compression"),
        "a zip bomb (64 MiB of zeros)": (honest, f"pop-a/{SEGMENT}/0-67108864",
                                         zstd(bytes(64 << 20)), "too-large"),
        "a body past the limit (noise)": (honest, raw(one)[0],
                                          os.urandom(MAX_BODY_BYTES + 1), "too-large"),
        "a range longer than the records": (honest, f"pop-a/{SEGMENT}/0-{len(one) + 10}",
                                            zstd(one), "bad-range"),
        "a cut frame header": (honest, *raw(one + b"\x05\x00"), "bad-framing"),
        "a frame running past the batch": (honest, *raw(struct.pack("<II", 500, 0) + b"x" * 8),
                                           "bad-framing"),
        "a bad CRC": (honest, *raw(bytes(bad_crc)), "bad-crc"),
        "an unknown record type": (honest, *raw(frame(bytes([9]) + struct.pack("<Q", now))),
                                   "bad-record"),
        "bytes after a record's fields": (honest, *raw(frame(pixel(2, camp, ad, 9, 1) + b"!")),
                                          "bad-record"),
        "a string cut short": (honest, *raw(frame(pixel(2, camp, ad, 9, 1)[:-15])),
                               "bad-record"),
        "an empty record": (honest, *raw(frame(b"")), "bad-record"),
        "a decision claiming 4 billion placements": (
            honest, *raw(frame(bytes([1]) + struct.pack("<Q", now) + text("r") + text("u")
                               + struct.pack("<II", 1, 0xFFFFFFFF))), "bad-record"),
        "a version never published": (honest, *raw(frame(pixel(2, camp, ad, 9, 999))),
                                      "unknown-version"),
        "version 0": (honest, *raw(frame(pixel(3, camp, ad, 9, 0))), "unknown-version"),
        "an impression of a campaign the version never had": (
            honest, *raw(frame(pixel(2, "camp-forged", ad, 9, 1))), "unknown-campaign"),
        "a decision claiming a campaign the version never had": (
            honest, *raw(frame(decision("req-f", 1, [("camp-forged", ad)]))),
            "unknown-campaign"),
        "a click on another campaign's ad": (honest, *raw(frame(pixel(3, camp, ad2, 9, 1))),
                                             "unknown-ad"),
        "good records with one forged campaign among them": (
            honest, *raw(frame(pixel(2, camp, ad, 11, 1)) + frame(pixel(2, camp2, ad, 12, 1))),
            "unknown-ad"),
        "an event a day in the future": (
            honest, *raw(frame(pixel(2, camp, ad, 9, 1, time_ms=now + 2 * 86_400_000))),
            "bad-time"),
        "an event at the epoch": (honest, *raw(frame(pixel(2, camp, ad, 9, 1, time_ms=1))),
                                  "bad-time"),
        "a revoked PoP": (revoked, *batch_of("pop-r", good), "revoked"),
        "no client certificate": (stranger, good_id, good_body, "no-certificate"),
        # Deduplicated, not refused: acknowledged, nothing stored again.
        "a replayed batch": (honest, *batch_of("pop-a", [decision("req-1", 1, [(camp, ad)]),
                                                         pixel(2, camp, ad,
                                                               0x1122334455667788, 1)]),
                             "duplicate"),
        "an impression fired again, in a new batch": (
            honest, *batch_of("pop-a", [pixel(2, camp, ad, 0x1122334455667788, 1)],
                              start=50_000), "duplicate"),
    }
    return cases
