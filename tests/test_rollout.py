"""Rollout stages as pure decisions over rows, and the origin's store of versions."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from appliance.origin import rollout
from appliance.origin.db import OriginDB, OriginError, PopRow, VersionRow
from appliance.snapshot import synth
from appliance.up import REPO, free_port
from tests.fault_harness import kill_when, watching

pytestmark = pytest.mark.integration

PLAN = rollout.Plan(canaries=("c1",), percent=50, stage_timeout=60)


def pop(pid: str, version: int = 0, state: str = "active", failed: int = 0) -> PopRow:
    return PopRow(pid, "", "default", 0, 0, version, "", 0, 0, "boom" if failed else "", state,
                  failed, "{}")


def ver(version: int, stage: str, started: float = 1000.0) -> VersionRow:
    return VersionRow(version, "", 0, 0, 0, stage, started, "")


FLEET = [pop("c1"), pop("p1"), pop("p2"), pop("p3"), pop("p4")]


def test_members_by_stage() -> None:
    assert rollout.members("canary", FLEET, PLAN) == ["c1"]
    assert rollout.members("percent", FLEET, PLAN) == ["c1", "p1", "p2"]
    assert rollout.members("all", FLEET, PLAN) == ["c1", "p1", "p2", "p3", "p4"]
    assert rollout.first_stage(FLEET, PLAN) == "canary"
    assert rollout.first_stage([pop("p1")], PLAN) == "percent"  # no canary registered


def test_a_stage_moves_on_when_its_pops_report_the_version_active() -> None:
    v = ver(7, "canary")
    assert rollout.step(v, FLEET, PLAN, 1001) is None
    moved = [pop("c1", 7), *FLEET[1:]]
    assert rollout.step(v, moved, PLAN, 1001) == ("percent", "")
    checking = [pop("c1", 7, state="checking"), *FLEET[1:]]
    assert rollout.step(v, checking, PLAN, 1001) is None


def test_a_failed_canary_or_a_silent_stage_halts() -> None:
    v = ver(7, "canary")
    failed = [pop("c1", 6, failed=7), *FLEET[1:]]
    stage, why = rollout.step(v, failed, PLAN, 1001) or ("", "")
    assert stage == "halted" and "c1" in why and "boom" in why
    stage, why = rollout.step(v, FLEET, PLAN, 1000 + 61) or ("", "")
    assert stage == "halted" and "timed out" in why
    # The last stage is released, not gated: a PoP that is away does not halt it.
    assert rollout.step(ver(7, "all"), FLEET, PLAN, 10_000) is None


def test_assigned_version_skips_halted_and_respects_stages() -> None:
    versions = [ver(1, "done"), ver(2, "halted"), ver(3, "canary")]
    assert rollout.assigned_version("c1", versions, FLEET, PLAN) == 3
    assert rollout.assigned_version("p1", versions, FLEET, PLAN) == 1
    assert rollout.assigned_version("newcomer", [ver(4, "all")], FLEET, PLAN) == 4


def test_versions_only_go_up_and_payloads_are_named_by_hash(tmp_path: Path) -> None:
    db = OriginDB(tmp_path)
    db.add_version(1, b"{}", b"payload-1", "a" * 64, 1, 0, "percent")
    assert db.next_version() == 2
    with pytest.raises(OriginError, match="not above"):
        db.add_version(1, b"{}", b"again", "b" * 64, 1, 0, "percent")
    assert db.payload_path("a" * 64) is not None
    assert db.payload_path("../../etc/passwd") is None
    with pytest.raises(OriginError, match="no campaign"):
        db.set_paused("nope", True)


def test_reports_count_a_repeated_refusal_once(tmp_path: Path) -> None:
    db = OriginDB(tmp_path)
    db.register("p1", "", "default")
    for _ in range(3):  # the same refusal at three polls
        db.report("p1", {"version": 1, "error": "rollback: v4", "refused": {"rollback": 1}})
    db.report("p1", {"version": 1, "error": "expired: v5", "refused": {"rollback": 3,
                                                                      "expired": 1}})
    (row,) = db.pops()
    assert row.failures == 2 and row.last_error == "expired: v5"
    assert json.loads(row.refused) == {"rollback": 3, "expired": 1}


def test_payloads_are_immutable_with_etag_and_range(tmp_path: Path) -> None:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from appliance.origin.server import Origin

    db = OriginDB(tmp_path)
    payload = bytes(range(256)) * 64
    sha = "c" * 64
    db.add_version(1, b'{"m": 1}', payload, sha, 1, 0, "done")

    async def scenario() -> None:
        origin = Origin(db, PLAN, push_parallelism=2)
        async with TestClient(TestServer(origin.app())) as client:
            whole = await client.get(f"/v1/payload/{sha}")
            assert whole.status == 200 and await whole.read() == payload
            assert "immutable" in whole.headers["Cache-Control"]
            etag = whole.headers["ETag"]
            again = await client.get(f"/v1/payload/{sha}", headers={"If-None-Match": etag})
            assert again.status == 304
            part = await client.get(f"/v1/payload/{sha}", headers={"Range": "bytes=100-199"})
            assert part.status == 206 and await part.read() == payload[100:200]
            missing = await client.get(f"/v1/payload/{'d' * 64}")
            assert missing.status == 404
            assert (await missing.json())["error"]["code"] == "no-such-payload"
            manifest = await client.get("/v1/manifest?pop=anyone")
            assert manifest.status == 200 and await manifest.read() == b'{"m": 1}'
            bad = await client.post("/v1/pops/p1/register", data=b"not json")
            assert bad.status == 400
            unknown = await client.post("/v1/pops/ghost/status", json={"version": 1})
            assert unknown.status == 404

    asyncio.run(scenario())


def test_origin_cleans_what_a_killed_publish_left(tmp_path: Path) -> None:
    """Issue 20, case 8: a publish killed midway leaves a .tmp payload or a payload file no
    version references; the origin removes them when it starts. While a publish holds the
    lock, a fresh file (its payload) stays; a referenced one always stays."""
    db = OriginDB(tmp_path)
    kept = db.add_version(1, b"{}", b"payload one", "a" * 64, 1, 0, "all")
    stale_tmp = db.payload_dir / ("b" * 64 + ".tmp")
    stale_orphan = db.payload_dir / ("c" * 64 + ".capnp")
    fresh_orphan = db.payload_dir / ("d" * 64 + ".capnp")
    for path in (stale_tmp, stale_orphan, fresh_orphan):
        path.write_bytes(b"x" * 1000)
    old = time.time() - 7200
    for path in (stale_tmp, stale_orphan, kept):
        os.utime(path, (old, old))
    lock = os.open(tmp_path / "publish.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a publish running in another process
    try:
        assert sorted(db.clean_leftovers()) == sorted([stale_tmp, stale_orphan])
        assert kept.exists() and fresh_orphan.exists()
    finally:
        os.close(lock)
    assert db.clean_leftovers() == [fresh_orphan]  # no publish runs: nothing is in use
    assert kept.exists() and db.clean_leftovers() == []


def test_publish_killed_midway_three_times_leaves_nothing_after_the_next_start(
        tmp_path: Path) -> None:
    """Real kill -9 the moment a publish creates its payload file (inotify), three times:
    SQLite stays whole, `origin serve` removes every leftover at its start, and the next
    publish works."""
    conf = tmp_path / "origin.toml"
    port = free_port()
    conf.write_text(f'[origin]\nlisten = "127.0.0.1:{port}"\n'
                    f'state_dir = "{tmp_path / "origin"}"\n')
    campaigns = tmp_path / "campaigns"
    synth.write(synth.generate(3000, seed=5), campaigns)
    cli = [sys.executable, "-m", "appliance.cli"]
    subprocess.run([*cli, "origin", "campaigns", "import", str(campaigns), "--config",
                    str(conf)], check=True, capture_output=True, cwd=REPO)
    payloads = tmp_path / "origin" / "payloads"
    for _ in range(3):
        # Each publish of the same campaigns has a new version, so a new payload.
        with watching(payloads) as fd:
            publish = subprocess.Popen([*cli, "origin", "publish", "--allow-jump", "--config",
                                        str(conf)], cwd=REPO, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            kill_when(fd, lambda name: name.endswith(".tmp"), partial(int, publish.pid))
            assert publish.wait(30) == -signal.SIGKILL
    assert any(p.suffix in (".tmp", ".capnp") for p in payloads.iterdir())
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([*cli, "origin", "serve", "--config", str(conf)], cwd=REPO,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "listening" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        serve.terminate()
        serve.wait(15)
    assert "payload files left by interrupted publishes" in log.read_text()
    assert list(payloads.iterdir()) == []
    db = OriginDB(tmp_path / "origin")
    assert db._db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.versions() == []
    done = subprocess.run([*cli, "origin", "publish", "--allow-jump", "--config", str(conf)],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.startswith("published v1")
    assert [p.name for p in payloads.iterdir()] == [f"{db.versions()[0].sha256}.capnp"]


def test_origin_database_and_up_configs_are_owner_only(tmp_path: Path) -> None:
    """Issue 20, case 8: origin.sqlite (and its WAL), and the two configurations `adpop up`
    writes, are 0600, also when an older run left them 0644."""
    from appliance.up import _write_configs

    (tmp_path / "origin").mkdir()
    (tmp_path / "origin" / "origin.sqlite").touch(mode=0o644)
    db = OriginDB(tmp_path / "origin")
    db.add_version(1, b"{}", b"payload", "e" * 64, 1, 0, "all")
    for name in ("origin.sqlite", "origin.sqlite-wal"):
        assert (tmp_path / "origin" / name).stat().st_mode & 0o777 == 0o600, name
    (tmp_path / "appliance.toml").touch(mode=0o644)
    origin_toml, pop_toml, _ = _write_configs(tmp_path, 18080)
    for path in (origin_toml, pop_toml):
        assert path.stat().st_mode & 0o777 == 0o600, path
    # No shared push token any more (issue 22): the PoP enrolls with a token in a 0600 file.
    assert 'enrollment_token_file = "enroll-token"' in pop_toml.read_text()
    assert "push_token" not in origin_toml.read_text() + pop_toml.read_text()
