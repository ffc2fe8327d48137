"""End to end: a real origin process and three PoP processes on loopback.

pop-a is the canary and runs a real engine; pop-b and pop-c sync only. Versions 1 to 5 are
published and every PoP converges; pop-c is stopped through versions 3 and 4 and catches up
to 5 when it returns; then pop-a's engine dies, so version 6 fails pop-a's health window,
the rollout halts, and the other PoPs stay on 5.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.model import CampaignSet
from appliance.up import free_port, root_json
from tests.engine_harness import ENGINE, UnixHTTPConnection, install, running_engine

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ADPOP = [sys.executable, "-m", "appliance.cli"]


def adpop(*args: str) -> str:
    done = subprocess.run([*ADPOP, *args], capture_output=True, text=True, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.origin_conf = tmp / "origin.toml"
        # TLS from the origin's private CA (the default): the PoPs enroll, then speak mutual
        # TLS, and push notices go to their enrolled addresses.
        self.origin_conf.write_text(
            f'[snapshot]\nttl = "1d"\n'
            f'[origin]\nlisten = "127.0.0.1:{self.port}"\nstate_dir = "{tmp / "origin"}"\n'
            f'[rollout]\ncanaries = ["pop-a"]\npercent = 50\nstage_timeout = "60s"\n')
        adpop("origin", "keys", "init", "--config", str(self.origin_conf))
        # What /v1/fleet needs: an operator token with the read role.
        adpop("origin", "tokens", "create", "e2e", "--role", "read", "--out",
              str(tmp / "operator-token"), "--config", str(self.origin_conf))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.confs: dict[str, Path] = {}

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen([*ADPOP, *args], stdout=log, stderr=log, cwd=REPO)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pop_conf(self, name: str, engine_socket: str = "") -> Path:
        conf = self.tmp / f"{name}.toml"
        adpop("origin", "pops", "enroll", name, "--out", str(self.tmp / name / "enroll-token"),
              "--config", str(self.origin_conf))
        conf.write_text(
            f'[pop]\nid = "{name}"\n[paths]\nstate_dir = "{self.tmp / name}"\n'
            f'[snapshot]\ntrust_root = "{root_json(self.tmp / "origin")}"\n'
            f'[sync]\norigin_url = "https://127.0.0.1:{self.port}"\npoll_interval = "2s"\n'
            f'push_listen = "127.0.0.1:{free_port()}"\n'
            f'health_window = 1\n'
            f'[engine]\nadmin_socket = "{engine_socket}"\n')
        self.confs[name] = conf
        return conf

    def start_pop(self, name: str) -> None:
        self.start(name, ["pop", "sync", "--config", str(self.confs[name])])

    def fleet(self) -> dict[str, Any]:
        with urllib.request.urlopen(read_fleet(f"https://127.0.0.1:{self.port}",
                                               self.tmp / "operator-token"), timeout=5,
                                    context=origin_tls(self.tmp / "origin")) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def wait_for(self, what: str, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                doc = self.fleet()
                if predicate(doc):
                    return doc
            except OSError:
                doc = {}
            if time.monotonic() > deadline:
                logs = {p.name: p.read_text()[-2000:] for p in self.tmp.glob("*.log")}
                raise AssertionError(f"timed out waiting for {what}: {doc} {logs}")
            time.sleep(0.1)

    def publish(self) -> None:
        adpop("origin", "publish", "--config", str(self.origin_conf))


def read_fleet(base: str, token: Path) -> urllib.request.Request:
    return urllib.request.Request(f"{base}/v1/fleet", headers={
        "Authorization": f"Bearer {token.read_text().strip()}"})


def origin_tls(state: Path) -> ssl.SSLContext:
    """A client trusting the origin's private CA (kept under its state folder)."""
    return ssl.create_default_context(cafile=str(state / "ca" / "ca.pem"))


def engine_version(admin: Path) -> int:
    conn = UnixHTTPConnection(str(admin))
    try:
        conn.request("GET", "/status")
        version: int = json.loads(conn.getresponse().read())["version"]
        return version
    finally:
        conn.close()


def versions(doc: dict[str, Any]) -> dict[str, int]:
    return {p["id"]: p["version"] for p in doc["pops"] if p["state"] == "active"}


def stage(doc: dict[str, Any], version: int) -> str:
    return next((v["stage"] for v in doc["versions"] if v["version"] == version), "")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        for name in list(f.procs):
            f.stop(name)


def test_publish_converge_catch_up_and_a_failed_canary_halts(fleet: Fleet) -> None:
    assert ENGINE.is_file(), "`make setup` builds the engine"
    adpop("origin", "campaigns", "import", str(REPO / "config" / "campaigns"), "--config",
          str(fleet.origin_conf))
    fleet.start("origin", ["origin", "serve", "--config", str(fleet.origin_conf)])

    admin = fleet.tmp / "engine-a.sock"
    fleet.pop_conf("pop-a", str(admin))
    for name in ("pop-b", "pop-c"):
        fleet.pop_conf(name)
    for name in ("pop-a", "pop-b", "pop-c"):
        fleet.start_pop(name)
    fleet.wait_for("three registered PoPs", lambda d: len(d["pops"]) == 3)
    fleet.publish()
    # pop-a's engine starts once a snapshot is active on disk (the supervisor's order); v1
    # counts as active only once the engine says it serves it, and from v2 on sync tells it
    # to load each version and watches it through the health window.
    current = fleet.tmp / "pop-a" / "current"
    deadline = time.monotonic() + 30
    while not current.exists():
        assert time.monotonic() < deadline, "pop-a never activated v1 on disk"
        time.sleep(0.05)
    engine = subprocess.Popen(
        [str(ENGINE), "--listen", f"127.0.0.1:{free_port()}", "--admin", str(admin),
         "--snapshot", str(current), "--shards", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fleet.wait_for("all on v1", lambda d: versions(d) == dict.fromkeys(
            ("pop-a", "pop-b", "pop-c"), 1))
        fleet.publish()
        fleet.wait_for("all on v2", lambda d: versions(d) == dict.fromkeys(
            ("pop-a", "pop-b", "pop-c"), 2))
        assert engine_version(admin) == 2

        fleet.stop("pop-c")
        for version in (3, 4):
            fleet.publish()
            # The canary and the percent stage (pop-b) take it; pop-c is away.
            fleet.wait_for(f"v{version} released", lambda d, v=version: stage(d, v) == "all")
            assert versions(fleet.fleet())["pop-b"] == version
        fleet.publish()
        fleet.wait_for("v5 on the running PoPs",
                       lambda d: versions(d).get("pop-a") == 5 and versions(d).get("pop-b") == 5)
        fleet.start_pop("pop-c")
        fleet.wait_for("pop-c caught up to v5", lambda d: versions(d).get("pop-c") == 5)
        # Straight from 2 to 5: a PoP that was away does not replay what it missed.
        assert sorted(os.listdir(fleet.tmp / "pop-c" / "snapshots")) == ["1", "2", "5"]

        assert engine_version(admin) == 5
        # The canary's engine hangs: v6 fails its health window there.
        engine.send_signal(signal.SIGSTOP)
        fleet.publish()
        doc = fleet.wait_for("v6 halted", lambda d: stage(d, 6) == "halted", timeout=60)
        halted = next(v["halted"] for v in doc["versions"] if v["version"] == 6)
        assert "pop-a" in halted and "failed" in halted
        pops = {p["id"]: p for p in doc["pops"]}
        assert pops["pop-a"]["failed_version"] == 6
        assert (fleet.tmp / "pop-a" / "current").resolve().name == "5"  # reverted by itself
        time.sleep(2.5)  # a poll interval: the others must not move
        assert versions(fleet.fleet()) == {"pop-a": 5, "pop-b": 5, "pop-c": 5}
        table = adpop("origin", "fleet", "--config", str(fleet.origin_conf))
        assert all(name in table for name in ("pop-a", "pop-b", "pop-c"))
        assert "v6 failed its health window" in table
        status = adpop("origin", "rollout", "status", "--config", str(fleet.origin_conf))
        assert "halted" in status.splitlines()[-1] and " 6 " in status.splitlines()[-1]
    finally:
        engine.send_signal(signal.SIGCONT)
        engine.kill()
        engine.wait()


def test_shipped_configs_work_together_on_loopback_with_no_edits(tmp_path: Path) -> None:
    """config/origin.toml and config/appliance.toml as shipped; --state moves all state."""
    origin_conf, pop_conf = str(REPO / "config" / "origin.toml"), str(REPO / "config" /
                                                                      "appliance.toml")
    o_state, p_state = tmp_path / "origin", tmp_path / "pop"
    origin = ["--config", origin_conf, "--state", str(o_state)]
    pop = ["--config", pop_conf, "--state", str(p_state)]
    adpop("origin", "keys", "init", *origin)
    adpop("origin", "campaigns", "import", str(REPO / "config" / "campaigns"), *origin)
    adpop("pop", "trust", str(root_json(o_state)), *pop)
    # The one step TLS adds: a token, where the shipped sync.enrollment_token_file looks.
    adpop("origin", "pops", "enroll", "pop-1", "--out", str(p_state / "enroll-token"), *origin)
    token = tmp_path / "operator-token"
    adpop("origin", "tokens", "create", "looker", "--out", str(token), *origin)
    procs = [subprocess.Popen([*ADPOP, "origin", "serve", *origin], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([*ADPOP, "pop", "sync", *pop], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while True:  # the PoP has registered with the origin on the default ports
            try:
                with urllib.request.urlopen(read_fleet("https://127.0.0.1:8700", token),
                                            timeout=2, context=origin_tls(o_state)) as r:
                    if json.loads(r.read())["pops"]:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the PoP did not register"
            time.sleep(0.1)
        adpop("origin", "publish", *origin)
        while not (p_state / "current").exists():
            assert time.monotonic() < deadline + 30, "v1 not activated"
            time.sleep(0.1)
        assert (p_state / "current").resolve().name == "1"
        assert not list(REPO.glob("var")) and (o_state / "origin.sqlite").is_file()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_pop_rollback_activates_a_retained_version_and_the_engine_loads_it(
        tmp_path: Path, sample_set: CampaignSet, signing_key: SigningKey) -> None:
    with running_engine(tmp_path, sample_set, signing_key, shards=1) as eng:
        install(eng.store, sample_set, 2, signing_key)
        eng.admin_call("POST", "/load")
        assert eng.status()["version"] == 2
        conf = tmp_path / "appliance.toml"
        conf.write_text(f'[paths]\nstate_dir = "{eng.store.root}"\n'
                        f'[engine]\nadmin_socket = "{eng.admin}"\n')
        out = adpop("pop", "rollback", "--config", str(conf))
        assert "active: v1 (was v2); the engine loaded it" in out
        assert eng.status()["version"] == 1
        assert eng.store.high_water() == 2  # sync will not take v1 back as new
        listing = adpop("pop", "snapshots", "--config", str(conf))
        assert "retained" in listing and "active" in listing
        bad = subprocess.run([*ADPOP, "pop", "rollback", "--to", "9", "--config", str(conf)],
                             capture_output=True, text=True, cwd=REPO, check=False)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        assert "no retained version 9" in bad.stderr


def test_key_rotations_reach_three_pops_without_touching_them(fleet: Fleet) -> None:
    """Issue 22's rotation exercise: three PoPs, the targets key rotated and then the root,
    a publish after each; every PoP serves each new version, following the new root by
    itself. Nothing on a PoP is touched. (That the retired keys are refused afterwards:
    test_sync.py's test_unknown_key, test_tuf_repo.py.)"""
    adpop("origin", "campaigns", "import", str(REPO / "config" / "campaigns"), "--config",
          str(fleet.origin_conf))
    fleet.start("origin", ["origin", "serve", "--config", str(fleet.origin_conf)])
    pops = ("pop-a", "pop-b", "pop-c")
    for name in pops:
        fleet.pop_conf(name)
        fleet.start_pop(name)
    fleet.wait_for("three registered PoPs", lambda d: len(d["pops"]) == 3)
    fleet.publish()
    fleet.wait_for("all on v1", lambda d: versions(d) == dict.fromkeys(pops, 1))
    for version, role in ((2, "targets"), (3, "root")):
        said = adpop("origin", "keys", "rotate", role, "--config", str(fleet.origin_conf))
        assert f"root v{version} in force" in said, said
        fleet.publish()
        fleet.wait_for(f"all on v{version} after the {role} rotation",
                       lambda d, v=version: versions(d) == dict.fromkeys(pops, v))
    for name in pops:
        trusted = json.loads((fleet.tmp / name / "tuf" / "root.json").read_text())
        assert trusted["signed"]["version"] == 3, name
