"""Events through NATS JetStream (issue 23, step 3) on real nats-server: batches published by
the PoPs' transport with their id as Nats-Msg-Id, consumed by the origin's ingest workers
(one durable pull consumer), stored, then acked: each batch once, through duplicates, a
store that fails for a while, and one node of a three-node cluster killed mid-run."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import pytest

from appliance.events.batch import Batch, cut
from appliance.events.nats import NatsTransport, ingest
from appliance.events.shipper import DeliveryError
from appliance.origin.events import Campaign, Catalog, EventStore, Outcome
from appliance.spool import crc32c, scan
from tests.nats_harness import nats_servers

pytestmark = pytest.mark.integration

SEGMENT = "shard-0-1796000000-000001"


def impression(n: int) -> bytes:
    def text(value: str) -> bytes:
        return struct.pack("<H", len(value)) + value.encode()

    body = (bytes([2]) + struct.pack("<Q", int(time.time() * 1000)) + text("camp-1")
            + text("ad-1") + text("slot") + struct.pack("<III", n, 0, 1))
    return struct.pack("<II", len(body), crc32c(body)) + body


def batches(pop: str, count: int) -> list[Batch]:
    data = b"".join(impression(n) for n in range(count))
    return list(cut(pop, SEGMENT, data, scan(data), max_bytes=len(impression(0)) * 10))


def store_at(path: Path) -> EventStore:
    catalog = Catalog(lambda version: None)
    catalog.versions[1] = {"camp-1": Campaign("adv-1", 2_000_000, frozenset({"ad-1"}))}
    return EventStore(path, catalog)


def stored(store: EventStore) -> int:
    with store.reader() as cursor:
        return int(cursor.execute("SELECT count(*) FROM events").fetchall()[0][0])


async def until(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def deliver(transport: NatsTransport, batch: Batch) -> None:
    """As the shipper does: a batch not acknowledged (no stream yet, a node gone) is sent
    again."""
    for _attempt in range(150):
        try:
            await transport.send(batch)
            return
        except DeliveryError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"batch {batch.id} never acknowledged")


class Flaky(EventStore):
    """The real store, failing its first few writes (a full disk, say): the worker naks,
    JetStream delivers again, and the batch is stored once it can be."""

    failures = 3

    def store(self, caller: str, batch_id: str, payload: bytes,
              now: object = time.time) -> Outcome:
        if self.failures > 0:
            self.failures -= 1
            from appliance.origin.events import EventStoreError

            raise EventStoreError("the disk is full (injected)")
        return super().store(caller, batch_id, payload)


def test_one_node_stores_each_batch_once_through_duplicates_and_store_failures(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        with nats_servers(tmp_path / "nats", 1) as cluster:
            catalog = Catalog(lambda version: None)
            catalog.versions[1] = {"camp-1": Campaign("adv-1", 2_000_000,
                                                      frozenset({"ad-1"}))}
            store = Flaky(tmp_path / "events.duckdb", catalog)
            stop = asyncio.Event()
            workers = asyncio.create_task(ingest(store, cluster.urls, 2, 1, stop))
            sent = batches("pop-a", 200)
            transport = NatsTransport(cluster.urls)
            for batch in sent:
                await deliver(transport, batch)
            for batch in sent[:50]:  # sent again: JetStream's window drops them
                await deliver(transport, batch)
            await until("every batch stored", lambda: stored(store) == 200)
            await asyncio.sleep(1.0)  # anything more would arrive now
            assert stored(store) == 200
            assert store.failures == 0  # the failed writes were delivered again
            # A batch naming another PoP than its subject is terminated, never stored.
            forged = Batch("pop-b", SEGMENT, sent[0].start, sent[0].end, sent[0].records,
                           sent[0].payload)
            client = transport.client
            await client.jetstream().publish("adpop.events.pop-a", forged.payload,
                                             headers={"Nats-Msg-Id": forged.id,
                                                      "Adpop-Batch": forged.id})
            await until("the forged batch refused",
                        lambda: store.counts.refused["not-your-pop"] == 1)
            await transport.close()
            stop.set()
            await workers
            assert stored(store) == 200

    asyncio.run(scenario())


def test_a_three_node_cluster_loses_and_doubles_nothing_when_a_node_dies(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        with nats_servers(tmp_path / "nats", 3) as cluster:
            store = store_at(tmp_path / "events.duckdb")
            stop = asyncio.Event()
            workers = asyncio.create_task(ingest(store, cluster.urls, 3, 3, stop))
            sent = batches("pop-a", 600)
            transport = NatsTransport(cluster.urls)
            for i, batch in enumerate(sent):
                if i == len(sent) // 2:
                    cluster.nodes[0].kill()  # mid-run, kill -9
                await deliver(transport, batch)
            await until("every batch stored", lambda: stored(store) == 600, 90)
            await asyncio.sleep(1.0)
            assert stored(store) == 600
            await transport.close()
            stop.set()
            await workers

    asyncio.run(scenario())


def test_adpop_origin_ingest_stores_from_jetstream_and_stops_cleanly(tmp_path: Path) -> None:
    """`adpop origin ingest` (the store's one writer while no `serve` runs): batches priced
    from the origin's own published version, stored once, then SIGTERM."""
    import signal
    import subprocess
    import sys

    from appliance.origin.db import OriginDB
    from appliance.origin.events import open_store
    from appliance.snapshot import bundle, synth
    from appliance.snapshot.model import parse_documents

    sample = parse_documents(synth.generate(20, seed=3))
    built = bundle.build(sample, 1, [], ttl=86400, target_group="default", unsigned=True)
    state = tmp_path / "origin"
    db = OriginDB(state)
    db.add_version(1, built.manifest_bytes, built.payload, built.manifest.payload_sha256, 20,
                   0, "done")
    db.close()
    camp = sample.campaigns[0]

    def pixel(n: int) -> bytes:
        body = (bytes([2]) + struct.pack("<Q", int(time.time() * 1000))
                + struct.pack("<H", len(camp.id)) + camp.id.encode()
                + struct.pack("<H", len(camp.ads[0].id)) + camp.ads[0].id.encode()
                + struct.pack("<H", 4) + b"slot" + struct.pack("<III", n, 0, 1))
        return struct.pack("<II", len(body), crc32c(body)) + body

    data = b"".join(pixel(n) for n in range(300))
    sent = list(cut("pop-a", SEGMENT, data, scan(data), max_bytes=len(pixel(0)) * 25))

    async def publish(urls: str) -> None:
        transport = NatsTransport(urls)
        for batch in sent + sent[:3]:
            await deliver(transport, batch)
        await transport.close()

    with nats_servers(tmp_path / "nats", 1) as cluster:
        conf = tmp_path / "origin.toml"
        conf.write_text(f'[origin]\nstate_dir = "{state}"\n[events]\ntransport = "nats"\n'
                        f'nats_url = "{cluster.urls}"\n')
        worker = subprocess.Popen([sys.executable, "-m", "appliance.cli", "origin", "ingest",
                                   "--config", str(conf), "--workers", "2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            asyncio.run(publish(cluster.urls))
            deadline = time.monotonic() + 60
            while True:
                time.sleep(1.0)
                worker.send_signal(signal.SIGTERM)
                out, _ = worker.communicate(timeout=30)
                assert worker.returncode == 0, out.decode()[-2000:]
                store = open_store(state, read_only=True)
                try:
                    count = stored(store)
                finally:
                    store.close()
                if count == 300 or time.monotonic() > deadline:
                    break
                worker = subprocess.Popen([sys.executable, "-m", "appliance.cli", "origin",
                                           "ingest", "--config", str(conf)],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert count == 300
