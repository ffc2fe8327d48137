"""The origin killed -9 mid-commit, repeated (issue 23): a process storing batches as fast as
it can is killed at random moments; after each kill the store holds every batch it holds
whole (its id and all its rows, or neither), and sending everything again leaves exactly
one row per record."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.events.batch import Batch
from tests.test_events_nats import batches, store_at

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
RECORDS = 3000

STORER = """
import sys
from pathlib import Path
from tests.test_events_nats import batches, store_at

store = store_at(Path(sys.argv[1]))
for batch in batches("pop-a", int(sys.argv[2])):
    store.store("pop-a", batch.id, batch.payload)
    print(batch.id, flush=True)  # acknowledged: after the commit
"""


def check(path: Path, sent: list[Batch]) -> tuple[int, set[str]]:
    store = store_at(path)
    try:
        with store.reader() as cursor:
            ids = {row[0] for row in cursor.execute("SELECT id FROM batches").fetchall()}
            rows = int(cursor.execute("SELECT count(*) FROM events").fetchall()[0][0])
            per_batch = int(cursor.execute("SELECT coalesce(sum(stored), 0) FROM batches"
                                           ).fetchall()[0][0])
    finally:
        store.close()
    # Whole or nothing: rows only of batches that are there, all of each.
    assert rows == per_batch == sum(b.records for b in sent if b.id in ids)
    return rows, ids


def test_a_store_killed_mid_commit_keeps_batches_whole(tmp_path: Path,
                                                       rng: random.Random) -> None:
    path = tmp_path / "events.duckdb"
    sent = batches("pop-a", RECORDS)
    midway = 0
    for _round in range(8):
        storer = subprocess.Popen([sys.executable, "-c", STORER, str(path), str(RECORDS)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.6 + rng.random() * 0.8)  # past the start, among the commits
        storer.send_signal(signal.SIGKILL)
        out, err = storer.communicate()
        acknowledged = set(out.decode().split())
        rows, ids = check(path, sent)
        # Everything acknowledged is stored.
        assert acknowledged <= ids, err.decode()[-2000:]
        midway += 0 < len(ids) < len(sent)
    assert midway, "no kill landed while batches were being stored"
    store = store_at(path)
    try:
        for batch in sent:  # everything again, as shippers do after an outage
            store.store("pop-a", batch.id, batch.payload)
    finally:
        store.close()
    rows, ids = check(path, sent)
    assert rows == RECORDS and ids == {b.id for b in sent}
