"""The event pipeline (issue 23): origin ingest, impression-to-row lag, and the shipper's CPU.

Prints, from one run on this machine:
- ingest: spool records cut into the shipper's batches and stored through the origin's
  intake (decompress, CRC, decode, price, dedupe, one DuckDB transaction per batch), in rows
  per second, beside the same rows bulk-inserted straight into DuckDB (one Arrow table into
  the same schema) in the same run (goal: at least half that rate).
- lag: three PoPs' spools written at 10,000 impressions a second together (by this process,
  in the engine's format and rotation), shipped by three real shippers (one process of
  their own) over mutual TLS to a real `adpop origin serve`; each impression's commit time
  minus its event time, p50 and p99 (goal: p99 under 5 s).
- shipper CPU: that process's CPU time per 10,000 events, and as a share of one core at
  that rate (goal: under 2 %). The writer stands in for the engine: its records are the
  engine's, byte for byte; the engine's own cost of writing them is in bench_engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from appliance.events.batch import Batch, cut
from appliance.origin.events import SCHEMA, Catalog, EventStore, open_store
from appliance.snapshot import bundle, synth
from appliance.snapshot.model import parse_documents
from appliance.spool import crc32c, scan

REPO = Path(__file__).resolve().parent.parent
ADPOP = [sys.executable, "-m", "appliance.cli"]


def text(value: str) -> bytes:
    return struct.pack("<H", len(value)) + value.encode()


def frame(body: bytes) -> bytes:
    return struct.pack("<II", len(body), crc32c(body)) + body


def records(campaigns: list[tuple[str, str]], decisions: int, version: int = 1,
            start: int = 0) -> list[bytes]:
    """What an engine writes for `decisions` answers with one ad each: the decision, its
    impression, and a click for one in five."""
    now = int(time.time() * 1000)
    out = []
    for n in range(start, start + decisions):
        camp, ad = campaigns[n % len(campaigns)]
        out.append(frame(bytes([1]) + struct.pack("<Q", now) + text(f"req-{n}") + text("u")
                         + struct.pack("<II", version, 1) + text("slot-1")
                         + struct.pack("<I", 1) + text(camp) + text(ad)))
        pixel = text(camp) + text(ad) + text("slot-1") + struct.pack("<III", n, 0, version)
        out.append(frame(bytes([2]) + struct.pack("<Q", now) + pixel))
        if n % 5 == 0:
            out.append(frame(bytes([3]) + struct.pack("<Q", now) + pixel))
    return out


ROUNDS = 3  # each side measured this many times into a fresh database; the median is shown
POPS = ("pop-a", "pop-b", "pop-c")


def ingest(folder: Path, decisions: int) -> None:
    sample = parse_documents(synth.generate(200, seed=7))
    built = bundle.build(sample, 1, [], ttl=86400, target_group="default", unsigned=True)
    pairs = [(c.id, c.ads[0].id) for c in sample.campaigns]
    # Three PoPs' backlogs in the shipper's default batches, stored as the origin's
    # handlers do: each PoP's in order, the three at once (one thread each).
    per_pop = decisions // len(POPS)
    batches = {}
    size = 0
    for i, pop in enumerate(POPS):
        data = b"".join(records(pairs, per_pop, start=i * per_pop))
        size += len(data)
        batches[pop] = list(cut(pop, "shard-0-1796000000-000001", data, scan(data)))
    intake: list[float] = []
    bulk: list[float] = []
    for n in range(ROUNDS):
        store = EventStore(folder / f"ingest-{n}.duckdb", Catalog(
            lambda v: built.payload if v == 1 else None))
        threads = [threading.Thread(target=store_all, args=(store, pop, batches[pop]))
                   for pop in POPS]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        intake.append(time.perf_counter() - started)
        with store.reader() as cursor:
            rows = int(cursor.execute("SELECT count(*) FROM events").fetchall()[0][0])
            # As the intake stages them: the 128-bit key in two halves, times in ms.
            table = cursor.sql(
                "SELECT (key >> 64)::UBIGINT AS key_hi, (key & 18446744073709551615)::UBIGINT "
                "AS key_lo, type, epoch_ms(time) AS time, epoch_ms(stored) AS stored, pop, "
                "version, campaign, advertiser, ad, placement, request_id, request_hash, ads, "
                "price_micros FROM events").to_arrow_table()
        store.close()
        bulk.append(bulk_insert(folder / f"bulk-{n}.duckdb", table))
    took, base = statistics.median(intake), statistics.median(bulk)
    count = sum(len(b) for b in batches.values())
    print(f"ingest: {rows / took:,.0f} rows/s through the intake ({size // 1024:,} KiB of "
          f"records from 3 PoPs at once, {count} batches; {rows:,} rows), median of {ROUNDS}, "
          f"vs {rows / base:,.0f} rows/s bulk-inserted into DuckDB (the same rows as one "
          f"Arrow table, one statement, same schema): {base / took:.2f}x (goal >= 0.5)")


def store_all(store: EventStore, pop: str, batches: list[Batch]) -> None:
    for batch in batches:
        store.store(pop, batch.id, batch.payload)


def bulk_insert(path: Path, table: object) -> float:
    """Seconds to insert `table` (the rows the intake stored) into a fresh store in one go."""
    import duckdb

    baseline = duckdb.connect(str(path))
    baseline.execute(SCHEMA)
    started = time.perf_counter()
    baseline.register("rows", table)
    baseline.execute("BEGIN")
    baseline.execute(
        "INSERT INTO events SELECT (key_hi::UHUGEINT << 64) + key_lo, type, "
        "make_timestamp_ms(time), make_timestamp_ms(stored), pop, version, campaign, "
        "advertiser, ad, placement, request_id, request_hash, ads, price_micros FROM rows"
    ).fetchall()
    baseline.execute("COMMIT")
    took = time.perf_counter() - started
    baseline.close()
    return took


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


SHIPPERS = """
import asyncio, sys
from pathlib import Path
from appliance.events.shipper import Shipper
from appliance.events.transport import HttpTransport
from appliance.sync import identity

async def main():
    url, root = sys.argv[1], Path(sys.argv[2])
    stop = asyncio.Event()
    shippers = [Shipper(root / pop / "spool", pop, HttpTransport(
        url, pop, identity.context(identity.Files.under(root / pop / "identity"))))
        for pop in ("pop-a", "pop-b", "pop-c")]
    await asyncio.gather(*(s.run(stop) for s in shippers))

asyncio.run(main())
"""


def lag(folder: Path, rate: int, seconds: float) -> None:
    from appliance.origin import enroll
    from appliance.origin.ca import Authority, key_pem, new_key, public_pem
    from appliance.origin.db import OriginDB
    from appliance.up import free_port

    state = folder / "origin"
    sample = parse_documents(synth.generate(200, seed=7))
    built = bundle.build(sample, 1, [], ttl=86400, target_group="default", unsigned=True)
    db = OriginDB(state)
    db.add_version(1, built.manifest_bytes, built.payload, built.manifest.payload_sha256,
                   200, 0, "done")
    authority = Authority.open(state / "ca")
    for pop in ("pop-a", "pop-b", "pop-c"):
        key = new_key()
        done = enroll.exchange(db, authority, enroll.token(db, pop, "default"), public_pem(key))
        ident = folder / pop / "identity"
        ident.mkdir(parents=True)
        (ident / "pop.key").write_bytes(key_pem(key))
        (ident / "pop.pem").write_bytes(done.certificate)
        (ident / "ca.pem").write_bytes(done.ca)
        (folder / pop / "spool").mkdir()
    db.close()
    port = free_port()
    conf = folder / "origin.toml"
    conf.write_text(f'[origin]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{state}"\n')
    log = open(folder / "origin.log", "wb")  # noqa: SIM115 - the child keeps it
    origin = subprocess.Popen([*ADPOP, "origin", "serve", "--config", str(conf)], cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT)
    shippers = subprocess.Popen([sys.executable, "-c", SHIPPERS, f"https://127.0.0.1:{port}",
                                 str(folder)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)  # both up
        pairs = [(c.id, c.ads[0].id) for c in sample.campaigns]
        user_before, system_before = cpu_seconds(shippers.pid)
        written = write_spools(folder, pairs, rate, seconds)
        user_after, system_after = cpu_seconds(shippers.pid)
        user, system = user_after - user_before, system_after - system_before
        cpu = user + system
        deadline = time.monotonic() + 60
        while any(any((folder / p / "spool").glob("*.closed"))
                  for p in ("pop-a", "pop-b", "pop-c")):
            if time.monotonic() > deadline:
                raise SystemExit("the spools did not drain")
            time.sleep(0.2)
        time.sleep(1)
    finally:
        shippers.send_signal(signal.SIGTERM)
        shippers.wait(10)
        origin.send_signal(signal.SIGTERM)
        origin.wait(30)
        log.close()
    store = open_store(state, read_only=True)
    with store.reader() as cursor:
        lags = [row[0] for row in cursor.execute(
            "SELECT epoch_ms(stored) - epoch_ms(time) FROM events WHERE type = 'impression' "
            "ORDER BY 1").fetchall()]
    store.close()
    q = statistics.quantiles(lags, n=100)
    print(f"lag: {len(lags):,} impressions of {written:,} written at {rate:,}/s from 3 PoPs "
          f"for {seconds:.0f} s: impression to stored row p50 {q[49] / 1000:.2f} s, "
          f"p99 {q[98] / 1000:.2f} s (goal p99 < 5 s)")
    per_10k = cpu / written * 10_000
    print(f"shipper CPU: {per_10k * 1000:.1f} ms per 10,000 events ({user / cpu:.0%} user, "
          f"{system / cpu:.0%} system), {cpu / seconds * 100:.2f} % of a core at "
          f"{rate:,} events/s (goal < 2 %)")


def write_spools(folder: Path, pairs: list[tuple[str, str]], rate: int,
                 seconds: float) -> int:
    """Impressions into each PoP's open segment, as the engine writes them (one write per
    10 ms batch, rotation every 2 s); returns how many."""
    pops = POPS
    per_tick = rate // 100 // len(pops)
    written = 0
    started = time.monotonic()
    opened = {p: (started, (folder / p / "spool" / f"shard-0-{int(time.time())}-000000.spool"))
              for p in pops}
    sequence = 0
    tick = 0
    while time.monotonic() - started < seconds:
        for pop in pops:
            since, path = opened[pop]
            now = int(time.time() * 1000)
            data = b"".join(frame(bytes([2]) + struct.pack("<Q", now) + text(c) + text(a)
                                  + text("slot-1")
                                  + struct.pack("<III", written + i, 0, 1))
                            for i, (c, a) in enumerate(pairs[:per_tick]))
            with open(path, "ab") as out:
                out.write(data)
            written += per_tick
            if time.monotonic() - since >= 2.0:
                path.rename(path.with_suffix(".closed"))
                sequence += 1
                opened[pop] = (time.monotonic(), path.with_name(
                    f"shard-0-{int(time.time())}-{sequence:06d}.spool"))
        tick += 1
        time.sleep(max(0.0, started + tick * 0.01 - time.monotonic()))
    for pop in pops:
        _, path = opened[pop]
        if path.exists():
            path.rename(path.with_suffix(".closed"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=120_000)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ingest(Path(tmp), args.decisions)
    with tempfile.TemporaryDirectory() as tmp:
        lag(Path(tmp), args.rate, args.seconds)


if __name__ == "__main__":
    main()
