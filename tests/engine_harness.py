"""Start the real engine binary on a compiled snapshot and talk to it, for integration tests."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.snapshot import bundle
from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.model import CampaignSet, parse_documents
from appliance.snapshot.store import SnapshotStore
from appliance.up import free_port

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "engine" / "build" / "adpop-engine"




class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the engine's admin socket)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


@dataclass
class RunningEngine:
    process: subprocess.Popen[bytes]
    port: int
    admin: Path
    store: SnapshotStore
    log: Path
    spool: Path
    metrics_port: int

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        """GET on the serving port (or `port`, e.g. metrics_port)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", path, body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def admin_call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = UnixHTTPConnection(str(self.admin))
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body))
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        code, body = self.admin_call("GET", "/status")
        assert code == 200, body
        result: dict[str, Any] = body
        return result

    def alive(self) -> bool:
        return self.process.poll() is None


def install(store: SnapshotStore, campaign_set: CampaignSet, version: int, key: SigningKey,
            now: int | None = None) -> bundle.Bundle:
    built = bundle.build(campaign_set, version, [key], ttl=86400, target_group="default",
                         now=now)
    store.install(version, built.manifest_bytes, built.payload)
    return built


@contextmanager
def running_engine(workdir: Path, campaign_set: CampaignSet, key: SigningKey,
                   extra: Sequence[str] = (), shards: int = 2,
                   binary: Path = ENGINE) -> Iterator[RunningEngine]:
    """The engine (`binary`, e.g. the ThreadSanitizer build) serving `campaign_set` as
    version 1 from a real store, with a token key and a spool folder under `workdir`;
    stopped after."""
    assert binary.is_file(), f"{binary} missing: `make setup` builds the engine"
    token_key = workdir / "token.key"
    if not token_key.exists():
        token_key.write_bytes(os.urandom(32))
    spool = workdir / "spool"
    spool.mkdir(exist_ok=True)
    store = SnapshotStore(workdir / "state", keep=3)
    if store.current_version() is None:
        install(store, campaign_set, 1, key)
    port, metrics_port = free_port(), free_port()
    admin = workdir / "engine.sock"
    log = workdir / "engine.log"
    with open(log, "wb") as log_fh:
        process = subprocess.Popen(
            [str(binary), "--listen", f"127.0.0.1:{port}", "--admin", str(admin),
             "--snapshot", str(store.current_link), "--shards", str(shards),
             "--token-key", str(token_key), "--spool", str(spool),
             "--metrics-listen", f"127.0.0.1:{metrics_port}", *extra],
            stdout=log_fh, stderr=subprocess.STDOUT)
    engine = RunningEngine(process, port, admin, store, log, spool, metrics_port)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise AssertionError(f"engine exited: {log.read_text()}")
            try:
                if engine.get("/healthz")[0] == 200 and admin.exists():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not healthy in time: {log.read_text()}")
            time.sleep(0.05)
        yield engine
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if os.path.exists(admin):
            os.unlink(admin)


def controls_set(cap_scope: str = "campaign") -> CampaignSet:
    """Small set for delivery controls: on placement "slot" (300x250) a capped campaign
    (2 per hour, tier 1), a budget-limited one (eCPM 1000, 2.00 a day, tier 2) and a house
    ad; on placement "lottery" (728x90) two tier-5 campaigns weighted 3 ("heavy") : 1."""
    creatives = [
        {"id": f"cr-{n}", "advertiser": f"adv-{n}", "size": size,
         "url": f"https://{n}.example/a.png", "landing_url": f"https://{n}.example/"}
        for n, size in (("cap", "300x250"), ("pace", "300x250"), ("house", "300x250"),
                        ("heavy", "728x90"), ("light", "728x90"))]
    forever = {"start": 0, "end": 2_000_000_000}
    doc = {
        "advertisers": [{"id": f"adv-{n}"} for n in ("cap", "pace", "house", "heavy", "light")],
        "creatives": creatives,
        "placements": [{"id": "slot", "zone": "z", "sizes": ["300x250"]},
                       {"id": "lottery", "zone": "z", "sizes": ["728x90"]}],
        "campaigns": [
            {"id": "capped", "advertiser": "adv-cap", "priority": 1, **forever,
             "ads": [{"id": "ad-cap", "creative": "cr-cap"}],
             "frequency_caps": [{"count": 2, "window": "1h", "scope": cap_scope}]},
            {"id": "budgeted", "advertiser": "adv-pace", "priority": 2, **forever,
             "ecpm": 1000.0, "budget_daily": 2.0, "pacing": "asap",
             "ads": [{"id": "ad-pace", "creative": "cr-pace"}]},
            {"id": "house", "advertiser": "adv-house", "priority": 16, **forever,
             "ads": [{"id": "ad-house", "creative": "cr-house"}]},
            {"id": "heavy", "advertiser": "adv-heavy", "priority": 5, "weight": 3, **forever,
             "ads": [{"id": "ad-heavy", "creative": "cr-heavy"}]},
            {"id": "light", "advertiser": "adv-light", "priority": 5, "weight": 1, **forever,
             "ads": [{"id": "ad-light", "creative": "cr-light"}]},
        ],
    }
    return parse_documents([("controls", doc)])
