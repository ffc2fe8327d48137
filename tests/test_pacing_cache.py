"""The engine keeps its spend, reservations and impression dedup window in the PoP cache
(engine/CACHE.md), against a real redis-server: an engine killed -9 spends nothing twice and
counts no impression twice; a cache stopped, frozen (SIGSTOP) or restarted empty never makes
a request wait, costs no spend, and the decisions made meanwhile are counted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from appliance import cache
from appliance.snapshot.manifest import SigningKey
from appliance.up import free_port
from tests.engine_harness import RunningEngine, controls_set, running_engine
from tests.test_engine_tracking import allowance, pacing_of

pytestmark = pytest.mark.integration


class Cache:
    """redis-server with the appliance's password, on a port that survives restarts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.password_file = folder / "secrets" / "cache.password"
        self.password = cache.write_secrets(self.password_file)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server missing: `make setup` installs it"
        data = self.folder / "data"
        shutil.rmtree(data, ignore_errors=True)  # every start is an empty cache
        data.mkdir(parents=True)
        argv = cache.redis_argv(binary, f"127.0.0.1:{self.port}", 32 << 20, data,
                                self.password_file.parent)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=15)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def pace(self) -> dict[bytes, bytes]:
        day = int(time.time()) // 86400
        found = self.client().hgetall(f"adpop:pace:{day}")
        return {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
                for k, v in found.items()}


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path / "cache")
    c.start()
    try:
        yield c
    finally:
        if c.process is not None:
            c.stop()


def flags(kv: Cache) -> list[str]:
    return ["--cache", f"127.0.0.1:{kv.port}", "--cache-password-file", str(kv.password_file),
            "--cache-timeout-ms", "200"]


def serve_budgeted(eng: RunningEngine, n: int, tag: str) -> list[dict[str, Any]]:
    """The ads of the budgeted campaign among n answers (second slot, as in the tracking
    tests: the capped campaign takes the first for each new user)."""
    served = []
    for i in range(n):
        code, answer = eng.post("/v1/decide", {"id": f"{tag}-{i}",
                                               "placements": [{"id": "slot", "count": 2}],
                                               "user": {"key": f"{tag}-{i}"}})
        assert code == 200, answer
        served += [a for a in answer["placements"][0]["ads"] if a["campaign"] == "budgeted"]
    return served


def until(what: str, check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kept(kv: Cache) -> tuple[int, int]:
    """Spend and pending reservations kept in the cache, summed over campaigns and shards."""
    spent = pending = 0
    for value in kv.pace().values():
        s, reserved, shown, _ = (int(x) for x in value.split())
        spent += s
        pending += reserved - shown
    return spent, max(0, pending)


def test_an_engine_killed_mid_run_spends_nothing_twice(tmp_path: Path, kv: Cache,
                                                       signing_key: SigningKey) -> None:
    def start() -> Any:
        return running_engine(tmp_path, controls_set(), signing_key, extra=flags(kv))

    with start() as eng:
        assert eng.admin_call("POST", "/allowances",
                              allowance(1, {"budgeted": 4_000_000}))[0] == 200
        time.sleep(0.4)
        shown = serve_budgeted(eng, 2, "shown")
        assert len(shown) == 2
        assert [eng.get(ad["imp"]) for ad in shown] == [(204, b"")] * 2
        # Two more, chosen and not yet shown when the engine dies.
        pending = serve_budgeted(eng, 2, "pending")
        assert len(pending) == 2
        until("spend and reservations kept", lambda: kept(kv) == (2_000_000, 2_000_000))
        eng.process.kill()
        eng.process.wait()

    for _ in range(2):  # killed again at once: what the cache holds is what counts
        with start() as eng:
            assert eng.admin_call("POST", "/allowances",
                                  allowance(1, {"budgeted": 4_000_000}))[0] == 200
            time.sleep(0.4)
            assert eng.status()["cache"]["pacing_restored"] >= 1
            # 2.00 spent and 2.00 reserved of 4.00: nothing more serves.
            assert serve_budgeted(eng, 4, "again") == []
            eng.process.kill()
            eng.process.wait()

    with start() as eng:
        assert eng.admin_call("POST", "/allowances",
                              allowance(1, {"budgeted": 4_000_000}))[0] == 200
        time.sleep(0.4)
        # The first engine's pixels fired again count once, not again ...
        for ad in shown:
            assert eng.get(ad["imp"]) == (204, b"")
        assert eng.status()["events"]["impressions_duplicate"] == 2
        # ... and the pending ones count now, against the reservations they were given.
        for ad in pending:
            assert eng.get(ad["imp"]) == (204, b"")
        until("every impression charged once",
              lambda: pacing_of(eng, "budgeted")["spent_micros"] == 4_000_000)
        assert pacing_of(eng, "budgeted")["reserved_micros"] == 0
        assert serve_budgeted(eng, 4, "after") == []


def test_a_frozen_stopped_or_emptied_cache_never_holds_a_request(
        tmp_path: Path, kv: Cache, signing_key: SigningKey) -> None:
    with running_engine(tmp_path, controls_set(), signing_key, extra=flags(kv)) as eng:
        assert eng.admin_call("POST", "/allowances",
                              allowance(1, {"budgeted": 50_000_000}))[0] == 200
        time.sleep(0.4)
        until("both shards linked", lambda: eng.status()["cache"]["shards_up"] == 2)
        assert len(serve_budgeted(eng, 3, "warm")) == 3

        # Frozen for 2 s: every request is answered all the same (the client would time out
        # at 10 s otherwise), the links drop, and what was decided meanwhile is counted.
        assert kv.process is not None
        kv.process.send_signal(signal.SIGSTOP)
        try:
            answered = answer_all(eng, 20, "frozen")
            time.sleep(0.6)
            answered += answer_all(eng, 20, "frozen-late")
        finally:
            kv.process.send_signal(signal.SIGCONT)
        assert answered == 40
        cache_state = eng.status()["cache"]
        assert cache_state["failed"] > 0 and cache_state["degraded_decisions"] > 0, cache_state
        until("links back", lambda: eng.status()["cache"]["shards_up"] == 2)
        until("what was decided meanwhile kept", lambda: in_step(eng, kv))

        # Restarted empty: within a second or so the engine has written everything again.
        kv.stop()
        assert answer_all(eng, 5, "down") == 5
        kv.start()
        assert kv.pace() == {}
        until("the figures rewritten", lambda: in_step(eng, kv))
        # And nothing past the cap, whatever the cache did.
        answer_all(eng, 60, "more")
        figures = pacing_of(eng, "budgeted")
        assert figures["spent_micros"] + figures["reserved_micros"] <= 50_000_000


def answer_all(eng: RunningEngine, n: int, tag: str) -> int:
    """Decisions answered (each one within the client's timeout, or the test fails)."""
    for i in range(n):
        code, _ = eng.post("/v1/decide", {"id": f"{tag}-{i}",
                                          "placements": [{"id": "slot", "count": 2}],
                                          "user": {"key": f"{tag}-{i}"}})
        assert code == 200
    return n


def in_step(eng: RunningEngine, kv: Cache) -> bool:
    """The cache holds the engine's own figures (and some)."""
    figures = pacing_of(eng, "budgeted")
    spent, pending = kept(kv)
    return pending > 0 and (spent, pending) == (figures["spent_micros"],
                                               figures["reserved_micros"])


def test_an_engine_starting_without_its_cache_waits_then_serves(
        tmp_path: Path, kv: Cache, signing_key: SigningKey) -> None:
    kv.stop()
    with running_engine(tmp_path, controls_set(), signing_key,
                        extra=[*flags(kv), "--restore-wait-ms", "1500"]) as eng:
        assert eng.admin_call("POST", "/allowances",
                              allowance(1, {"budgeted": 5_000_000}))[0] == 200
        time.sleep(0.3)
        code, answer = eng.admin_call("POST", "/decide", {
            "id": "why", "placements": [{"id": "slot", "count": 2}], "explain": True})
        assert code == 200, answer
        lost = {x["campaign"]: x.get("pacing")
                for x in answer["placements"][0]["explain"]["lost"]}
        assert lost.get("budgeted") == "starting", answer
        until("the wait over", lambda: serve_budgeted(eng, 1, f"w{time.monotonic()}"))
        assert eng.status()["cache"]["degraded_decisions"] > 0
        assert "no answer from the cache" in eng.log.read_text()
    assert os.path.exists(kv.password_file)


def first_ad(eng: RunningEngine, request_id: str, user: str) -> str:
    """The campaign of the first ad for a request with a user key and no cap token."""
    code, answer = eng.post("/v1/decide", {"id": request_id, "placements": [{"id": "slot"}],
                                           "user": {"key": user}})
    assert code == 200, answer
    return str(answer["placements"][0]["ads"][0]["campaign"])


def test_a_user_without_a_cap_token_is_capped_from_the_cache(
        tmp_path: Path, kv: Cache, signing_key: SigningKey) -> None:
    """The controls set's `capped` campaign serves a user twice an hour. A caller that sends
    the user's key and never a token is held to that by the user's counters in the cache,
    across shards and an engine killed -9; a frozen cache delays such a request by at most
    --cache-wait-us, and the decision is counted as made without it."""
    with running_engine(tmp_path, controls_set(), signing_key, extra=flags(kv)) as eng:
        served = [first_ad(eng, f"u-{i}", "alice") for i in range(3)]
        assert served == ["capped", "capped", "house"], served
        assert first_ad(eng, "u-bob", "bob") == "capped"  # someone else's counters are theirs
        assert eng.status()["cache"]["user_caps_waits"] >= 2
        until("alice's counters kept", lambda: kv.client().keys("adpop:caps:*"))
        eng.process.kill()
        eng.process.wait()
    with running_engine(tmp_path, controls_set(), signing_key, extra=flags(kv)) as eng:
        assert first_ad(eng, "u-again", "alice") == "house"
        assert first_ad(eng, "u-bob-2", "bob") == "capped"
        assert kv.process is not None
        kv.process.send_signal(signal.SIGSTOP)
        try:
            # Each waits its 2 ms and goes on without the counters: answered, and counted.
            assert first_ad(eng, "u-frozen", "carol") == "capped"
        finally:
            kv.process.send_signal(signal.SIGCONT)
        cache_state = eng.status()["cache"]
        assert cache_state["user_caps_missed"] >= 1 and cache_state["degraded_decisions"] >= 1
