"""The PoP's snapshot checks against an adversarial origin, one test per attack.

A fake origin (a real aiohttp server on loopback whose answers each test sets) and a fake
clock, in the style of python-tuf's repository simulator. Every attack must end in its typed
refusal, counted once, with `current` unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer._crypto_signer import CryptoSigner
from tuf.api.metadata import Metadata

from appliance import config as cfg
from appliance import secrets
from appliance.origin.publish import list_manifest
from appliance.origin.tuf_repo import Repository
from appliance.snapshot import bundle, synth
from appliance.snapshot.manifest import Manifest, Reason, canonical, sign
from appliance.snapshot.model import CampaignSet, parse_documents
from appliance.snapshot.store import SnapshotStore
from appliance.sync.agent import SyncAgent, roll_back
from appliance.up import free_port
from tests.waiting import until

pytestmark = pytest.mark.unit

NOW = 1_780_000_000  # the fake clock: every manifest is built relative to it


@dataclasses.dataclass
class FakeOrigin:
    """Serves whatever the test sets: manifest bytes, and a payload handler."""

    manifest: bytes | None = None
    payload: bytes = b""
    payload_handler: Callable[[web.Request], Any] | None = None
    port: int = 0
    tuf: Path | None = None  # the folder of a real TUF repository's metadata, served as is

    async def get_tuf(self, request: web.Request) -> web.StreamResponse:
        path = (self.tuf or Path("/nonexistent")) / request.match_info["name"]
        if "/" in request.match_info["name"] or not path.is_file():
            return web.Response(status=404)
        return web.Response(body=path.read_bytes())

    async def get_manifest(self, request: web.Request) -> web.Response:
        if self.manifest is None:
            return web.Response(status=204)
        return web.Response(body=self.manifest, content_type="application/json")

    async def get_payload(self, request: web.Request) -> web.StreamResponse:
        if self.payload_handler is not None:
            result: web.StreamResponse = await self.payload_handler(request)
            return result
        return web.Response(body=self.payload)

    registrations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    statuses: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    async def status(self, request: web.Request) -> web.Response:
        self.statuses.append(await request.json())
        return web.json_response({"ok": True})

    async def register(self, request: web.Request) -> web.Response:
        self.registrations.append(await request.json())
        return web.json_response({"ok": True})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeOrigin]:
        app = web.Application()
        app.add_routes([web.get("/v1/manifest", self.get_manifest),
                        web.get("/v1/payload/{sha}", self.get_payload),
                        web.get("/v1/tuf/{name}", self.get_tuf),
                        web.post("/v1/pops/{pop}/status", self.status),
                        web.post("/v1/pops/{pop}/register", self.register)])
        runner = web.AppRunner(app)
        await runner.setup()
        self.port = free_port()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()


@dataclasses.dataclass
class World:
    tmp: Path
    origin: FakeOrigin
    store: SnapshotStore
    agent: SyncAgent
    appliance: cfg.ApplianceConfig
    repo: Repository  # the origin's TUF repository, real; the PoP trusts its first root

    def listed(self, manifest: Manifest) -> bytes:
        """`manifest` as the origin lists it in its TUF targets."""
        data = sign(manifest, [])
        list_manifest(self.repo, data)
        return data

    def publish(self, version: int, campaigns: CampaignSet, *, group: str = "default",
                created: int = NOW, allow_jump: bool = False) -> bundle.Bundle:
        """As the origin publishes: an unsigned manifest, listed in the TUF targets."""
        built = bundle.build(campaigns, version, [], ttl=86400, target_group=group,
                             now=created, allow_jump=allow_jump, unsigned=True)
        self.origin.manifest = self.listed(built.manifest)
        self.origin.payload = built.payload
        self.origin.payload_handler = None
        return built


def campaigns(n: int, seed: int = 3) -> CampaignSet:
    return parse_documents(synth.generate(n, seed=seed))


@pytest.fixture(scope="module")
def small() -> CampaignSet:
    return campaigns(20)


@pytest.fixture
def world_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    repo = Repository.open(tmp_path / "origin-tuf")

    @asynccontextmanager
    async def make(**settings: Any) -> AsyncIterator[World]:
        origin = FakeOrigin(tuf=repo.metadata)
        async with origin.running():
            toml = [
                "[snapshot]", f'trust_root = "{repo.metadata / "1.root.json"}"',
                "[paths]", f'state_dir = "{tmp_path / "state"}"',
                "[sync]", f'origin_url = "http://127.0.0.1:{origin.port}"',
                f"fetch_timeout = {settings.get('fetch_timeout', 5)}", "health_window = 0",
                *settings.get("sync_lines", []),
            ]
            path = tmp_path / "appliance.toml"
            path.write_text("\n".join(toml) + "\n")
            appliance = cfg.load(cfg.Scope.APPLIANCE, path)
            store = SnapshotStore(tmp_path / "state")
            agent = SyncAgent.from_config(appliance, store, clock=lambda: NOW)
            async with ClientSession() as session:
                agent.session = session
                yield World(tmp_path, origin, store, agent, appliance, repo)

    yield make


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def refused(world: World, reason: Reason, current: int | None) -> None:
    """One sync attempt must refuse with `reason`, count it once, and keep `current`."""
    await world.agent.attempt()
    assert world.agent.state.refused == {reason.value: 1}, world.agent.state.error
    assert world.store.current_version() == current


def test_a_good_snapshot_is_activated(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()
            assert w.store.current_version() == 1 and not w.agent.state.refused
            assert w.agent.state.state == "active"
    run(scenario())


def test_rollback_to_an_older_version(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(5, small)
            await w.agent.attempt()
            w.publish(4, small)  # validly signed, but older than what the PoP has seen
            await refused(w, Reason.ROLLBACK, 5)
    run(scenario())


def test_freeze_with_an_expired_manifest(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small, created=NOW - 86400 - 301)  # expired past the 300 s slack
            await refused(w, Reason.EXPIRED, None)
    run(scenario())


def test_mix_and_match_manifest_and_payload(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            other = w.publish(3, campaigns(20, seed=9)).payload
            built = w.publish(2, small)
            w.origin.payload = other  # another snapshot's payload under this manifest
            assert len(other) != len(built.payload)  # same length: the test below
            await refused(w, Reason.LENGTH_MISMATCH, None)
    run(scenario())


def test_mix_and_match_same_length(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            built = w.publish(2, small)
            altered = bytearray(built.payload)
            altered[-1] ^= 0xFF  # same length, other bytes
            w.origin.payload = bytes(altered)
            await refused(w, Reason.HASH_MISMATCH, None)
    run(scenario())


def test_endless_data(world_factory: Any, small: CampaignSet) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(1000):  # bounded for the test; the PoP must stop long before
            await resp.write(b"\0" * 65536)
        return resp

    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            w.origin.payload_handler = endless
            await refused(w, Reason.LENGTH_MISMATCH, None)
            assert "the rest was not read" in w.agent.state.error
    run(scenario())


def test_endless_manifest(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            w.origin.manifest = b" " * (w.agent.policy.max_manifest_bytes + 1)
            await refused(w, Reason.TOO_LARGE, None)
    run(scenario())


def test_slow_retrieval(world_factory: Any, small: CampaignSet) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(100):  # one byte each 50 ms: 5 s at most, well past the deadline
            await resp.write(b"\0")
            await asyncio.sleep(0.05)
        return resp

    async def scenario() -> None:
        async with world_factory(fetch_timeout=1) as w:
            w.publish(1, small)
            w.origin.payload_handler = slow
            await refused(w, Reason.SLOW_RETRIEVAL, None)
    run(scenario())


def test_wrong_target_group(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small, group="other-group")
            await refused(w, Reason.WRONG_GROUP, None)
    run(scenario())


def test_a_manifest_changed_after_the_origin_listed_it_is_not_listed(
        world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            built = w.publish(1, small)
            doc = json.loads(built.manifest_bytes)
            doc["signed"]["expires"] += 86400 * 365  # altered after the origin listed it
            w.origin.manifest = canonical(doc)
            await refused(w, Reason.NOT_LISTED, None)
    run(scenario())


def _latest_targets(w: World) -> Path:
    return w.repo.metadata / f"{w.repo.load('targets').signed.version}.targets.json"


def test_bad_signature(world_factory: Any, small: CampaignSet) -> None:
    """The targets metadata altered after it was signed."""
    async def scenario() -> None:
        async with world_factory() as w:
            built = w.publish(1, small)
            targets = json.loads(_latest_targets(w).read_bytes())
            (listed,) = targets["signed"]["targets"].values()
            listed["length"] += 1  # and the manifest served to fit it
            _latest_targets(w).write_text(json.dumps(targets))
            w.origin.manifest = built.manifest_bytes + b" "
            await refused(w, Reason.BAD_SIGNATURE, None)
    run(scenario())


def test_unknown_key(world_factory: Any, small: CampaignSet) -> None:
    """Targets signed by a key the trusted root does not name (a stranger's, or a retired
    one): no signature counts."""
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            targets = Metadata.from_bytes(_latest_targets(w).read_bytes())
            targets.signatures.clear()
            targets.sign(CryptoSigner(Ed25519PrivateKey.generate()))
            _latest_targets(w).write_bytes(targets.to_bytes())
            await refused(w, Reason.BAD_SIGNATURE, None)
            assert "signed by 0/1 keys" in w.agent.state.error
    run(scenario())


def test_threshold_not_met(world_factory: Any, small: CampaignSet) -> None:
    """The root asks two targets keys; one signed."""
    async def scenario() -> None:
        async with world_factory() as w:
            root = w.repo.load("root")
            raised = copy.deepcopy(root.signed)
            raised.version += 1
            raised.add_key(w.repo._new_key("targets").public_key, "targets")
            raised.roles["targets"].threshold = 2
            md = Metadata(raised)
            for signer in w.repo._signers("root", raised.roles["root"].keyids):
                md.sign(signer, append=True)
            w.repo._save(md)
            w.publish(1, small)  # signed by one targets key
            await refused(w, Reason.THRESHOLD_NOT_MET, None)
    run(scenario())


def test_a_freeze_of_the_tuf_metadata(world_factory: Any, small: CampaignSet) -> None:
    """Metadata signed two days ago replayed today: its timestamp has expired."""
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            w.repo._save_online(w.repo.root(), w.repo.load("targets").signed.version,
                                time.time() - 2 * 86400)
            await refused(w, Reason.EXPIRED, None)
            assert "TUF metadata expired" in w.agent.state.error
    run(scenario())


def test_a_mix_and_match_of_tuf_metadata(world_factory: Any, small: CampaignSet) -> None:
    """The snapshot names targets version N; an older targets file is served under it."""
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            older = _latest_targets(w).read_bytes()
            w.publish(2, small)
            _latest_targets(w).write_bytes(older)
            await refused(w, Reason.ROLLBACK, None)
    run(scenario())


def test_a_rotated_targets_key_is_followed(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()
            assert w.repo.rotate("targets").startswith("root v2 in force")
            w.publish(2, small)
            await w.agent.attempt()
            assert w.store.current_version() == 2 and not w.agent.state.refused
    run(scenario())


def test_truncated_payload(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            built = w.publish(1, small)
            w.origin.payload = built.payload[:-100]
            await refused(w, Reason.LENGTH_MISMATCH, None)
    run(scenario())


def test_corrupt_capnp_pointers_signed_anyway(world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            built = w.publish(1, small)
            payload = bytearray(built.payload)
            # The root pointer (word 1) gives where the root's pointer section starts; point
            # its first pointers far outside the message.
            root = int.from_bytes(payload[8:16], "little")
            data_words = (root >> 32) & 0xFFFF
            start = 16 + ((root & 0xFFFFFFFF) >> 2) * 8 + data_words * 8
            for offset in range(start, start + 4 * 8, 8):
                payload[offset:offset + 8] = ((0x0FFFFFFF << 2) | 1).to_bytes(8, "little")
            manifest = dataclasses.replace(
                built.manifest, payload_sha256=hashlib.sha256(payload).hexdigest())
            w.origin.manifest = w.listed(manifest)  # a bad file the origin vouches for
            w.origin.payload = bytes(payload)
            await refused(w, Reason.CORRUPT_PAYLOAD, None)
    run(scenario())


def test_campaign_count_jump_is_held_unless_allowed(world_factory: Any,
                                                    small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()
            big = campaigns(100)
            w.publish(2, big)
            await refused(w, Reason.JUMP_HELD, 1)
            w.publish(3, big, allow_jump=True)
            await w.agent.attempt()
            assert w.store.current_version() == 3
    run(scenario())


def test_a_failed_health_window_reverts_and_reports(world_factory: Any,
                                                    small: CampaignSet) -> None:
    verdicts = iter(["", "engine serves v1, not v2"])

    async def health() -> str:
        return next(verdicts, "")

    async def scenario() -> None:
        async with world_factory() as w:
            w.agent.health = health
            w.publish(1, small)
            await w.agent.attempt()
            w.publish(2, campaigns(22))
            await w.agent.attempt()
            assert w.store.current_version() == 1
            assert w.agent.state.failed_version == 2
            assert "health window" in w.agent.state.error
            assert w.store.high_water() == 2  # a failed version is never taken again
    run(scenario())


def test_resume_after_an_interrupted_download(world_factory: Any, small: CampaignSet) -> None:
    served: list[str] = []

    async def cut_then_resume(request: web.Request) -> web.StreamResponse:
        served.append(request.headers.get("Range", ""))
        data = world.origin.payload
        if len(served) == 1:  # the first try breaks off half-way
            resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[:len(data) // 2])
            if request.transport is not None:
                request.transport.close()
            return resp
        start = int(served[-1].removeprefix("bytes=").rstrip("-"))
        return web.Response(status=206, body=data[start:],
                            headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})

    world: World

    async def scenario() -> None:
        nonlocal world
        async with world_factory() as w:
            world = w
            w.publish(1, small)
            w.origin.payload_handler = cut_then_resume
            await w.agent.attempt()
            assert w.store.current_version() is None  # the cut fetch is refused, kept
            await w.agent.attempt()
            assert w.store.current_version() == 1, w.agent.state.error
            # The second request asked only for what the first did not deliver (how much of
            # the half arrived before the cut depends on the client's buffering).
            assert served[0] == "" and served[1].startswith("bytes=")
            assert 0 < int(served[1][6:-1]) <= len(w.origin.payload) // 2
    run(scenario())


def test_a_signed_snapshot_with_an_absurd_price_is_refused(world_factory: Any,
                                                          small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()
            wild = dataclasses.replace(small, campaigns=(
                dataclasses.replace(small.campaigns[0], ecpm_micros=10**15),
                *small.campaigns[1:]))
            w.publish(2, wild)  # properly signed: the origin generated a bad file
            await refused(w, Reason.OUT_OF_BOUNDS, 1)
            assert "eCPM" in w.agent.state.error
    run(scenario())


def test_a_push_carries_the_manifest_and_only_the_tuf_targets_are_trusted(
        world_factory: Any, small: CampaignSet) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    async def scenario() -> None:
        async with world_factory() as w:
            built = w.publish(1, small)
            w.origin.manifest = None  # the origin's manifest endpoint has nothing: 204
            app = web.Application()
            app.add_routes([web.post("/v1/notify", w.agent.notify)])
            async with TestClient(TestServer(app)) as client:
                doc = json.loads(built.manifest_bytes)
                doc["signed"]["version"] = 9  # a forged notice
                forged = await client.post("/v1/notify", data=canonical(doc))
                assert forged.status == 202
                await refused(w, Reason.NOT_LISTED, None)
                good = await client.post("/v1/notify", data=built.manifest_bytes)
                assert good.status == 202
                await w.agent.attempt()
                assert w.store.current_version() == 1  # taken from the notice alone
    run(scenario())


def test_polling_runs_until_the_push_listener_can_bind(world_factory: Any,
                                                      small: CampaignSet) -> None:
    """The supervisor starts before the network is configured: a push address that cannot be
    bound yet must not stop sync, and is bound (and registered) once it can be."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]

    async def scenario() -> None:
        async with world_factory(sync_lines=[f'push_listen = "127.0.0.1:{port}"',
                                             'poll_interval = "1s"']) as w:
            w.publish(1, small)
            stop = asyncio.Event()
            task = asyncio.ensure_future(w.agent.run(stop))
            try:
                await until("v1 by polling", lambda: w.store.current_version() == 1)
                assert w.origin.registrations[0]["push_url"] == ""
                assert f"push listener on 127.0.0.1:{port} not up yet" in \
                    w.agent.state.last_logged
                held.close()
                url = f"http://127.0.0.1:{port}"
                await until("registration with the push URL",
                            lambda: w.origin.registrations[-1]["push_url"] == url)
                async with ClientSession() as session, \
                        session.post(f"{url}/v1/notify", data=b"{}") as resp:
                    assert resp.status == 202
            finally:
                stop.set()
                await task

    try:
        run(scenario())
    finally:
        held.close()


def padded_payload(campaign_set: CampaignSet, version: int, pad: int) -> bytes:
    """A valid payload made `pad` bytes bigger: the string blob and two attribute blobs carry
    unused tail bytes (a Data field holds under 512 MiB; every check still passes: the
    pointers reach the whole single segment)."""
    from appliance.snapshot.compiler import _single_segment, compile_payload, schema

    payload, _ = compile_payload(campaign_set, version, NOW)
    with schema().Payload.from_bytes(payload, traversal_limit_in_words=2**62) as reader:
        msg = reader.as_builder()
    share = pad // 3 + 1
    msg.stringBlob = bytes(msg.stringBlob) + b"\0" * share
    for attribute in list(msg.index.attributes)[:2]:
        attribute.blob = bytes(attribute.blob) + b"\0" * share
    return _single_segment(msg)


def test_a_1gib_sync_never_stalls_the_event_loop(world_factory: Any, small: CampaignSet
                                                 ) -> None:
    """Hashing, walking, writing and fsyncing a 1 GiB payload happen off the asyncio loop
    that sends WATCHDOG=1: a task ticking every 50 ms on that loop never waits as long as a
    health interval while the whole sync (verify, install, activate) runs."""
    payload = padded_payload(small, 1, 1 << 30)
    assert len(payload) > 1 << 30

    async def scenario() -> tuple[float, int]:
        async with world_factory() as w:
            manifest = dataclasses.replace(
                bundle.build(small, 1, [], unsigned=True, ttl=86400, target_group="default",
                             now=NOW).manifest,
                payload_sha256=hashlib.sha256(payload).hexdigest(), payload_length=len(payload))
            # The bytes are already downloaded (a resumed fetch finds them whole), so only
            # the checks and the install run: the part that used to block the loop.
            (w.store.root / f".partial-{manifest.payload_sha256}").write_bytes(payload)
            w.agent.pushed = w.listed(manifest)
            interval = float(w.appliance.supervisor.health_interval)
            worst, done = 0.0, asyncio.Event()

            async def ticker() -> None:
                nonlocal worst
                loop = asyncio.get_running_loop()
                while not done.is_set():
                    before = loop.time()
                    await asyncio.sleep(0.05)
                    worst = max(worst, loop.time() - before - 0.05)

            ticking = asyncio.ensure_future(ticker())
            await asyncio.sleep(0.2)
            await w.agent.attempt()
            done.set()
            await ticking
            assert w.store.current_version() == 1, w.agent.state.error
            return worst / interval, len(payload)

    share, size = run(scenario())
    assert share < 0.5, f"the loop stalled {share:.0%} of a health interval on {size} bytes"


def test_an_operators_rollback_pins_until_a_newer_version(world_factory: Any,
                                                          small: CampaignSet) -> None:
    """The pin outlives a supervisor restart, is never counted as a refusal, and ends when
    the origin publishes above the high-water mark."""
    from appliance.sync.agent import roll_back

    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()
            w.publish(2, small)
            await w.agent.attempt()
            assert "pinned by operator" in await roll_back(w.store, None, None)
            w.agent.adopt_current()
            for agent in (w.agent, SyncAgent.from_config(w.appliance, w.store, clock=lambda: NOW)):
                agent.session = w.agent.session
                await agent.attempt()  # the origin still offers v2
                report = agent.state.report()
                assert (report["state"], report["pinned"], report["error"]) == ("pinned", 1, "")
                assert not agent.state.refused and w.store.current_version() == 1
            w.publish(3, small)
            await w.agent.attempt()
            assert w.store.current_version() == 3 and w.store.pinned() is None
            assert (w.agent.state.state, w.agent.state.pinned) == ("active", 0)
    run(scenario())


def test_a_damaged_active_payload_falls_back_to_the_newest_whole_version_and_reports_it(
        world_factory: Any, small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            for version in (1, 2, 3):
                w.publish(version, campaigns(20 + version))
                await w.agent.attempt()
            assert w.store.current_version() == 3
            assert await w.agent.repair_current() == ""  # whole: nothing done
            for version in (3, 2):  # the active one and the newest other one
                with (w.store.path_of(version) / "payload.capnp").open("r+b") as fh:
                    fh.seek(100)
                    fh.write(b"\xff")
            done = await w.agent.repair_current()
            assert w.store.current_version() == 1
            assert w.store.versions() == [1]
            assert w.store.quarantined() == {2, 3}
            assert "v3:" in done and "fails its SHA-256" in done and "now v1" in done
            last = w.origin.statuses[-1]
            assert last["version"] == 1 and last["failed_version"] == 3
            assert "quarantined" in last["error"]
            # The origin still offers v3: a quarantined version is fetched again, whole.
            await w.agent.attempt()
            assert w.store.current_version() == 3 and w.store.check(3) == ""
    run(scenario())


def test_a_version_on_trial_is_checking_until_its_window_passes(world_factory: Any,
                                                                small: CampaignSet) -> None:
    """What a crash inside the window leaves: the next agent reports "checking", runs the
    window again, and only then reports "active"."""
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()
            w.publish(2, campaigns(22))
            manifest = await w.agent.sync_once()  # stored and switched, then "killed"
            assert manifest is not None and w.store.trial() is not None
            restarted = SyncAgent.from_config(w.appliance, w.store, clock=lambda: NOW)
            restarted.session = w.agent.session
            assert restarted.state.state == "checking" and restarted.state.version == 2
            await restarted.attempt()
            states = [(s["version"], s["state"]) for s in w.origin.statuses]
            assert states[-2:] == [(2, "checking"), (2, "active")]
            assert w.store.trial() is None and restarted.state.state == "active"
    run(scenario())


def test_the_enrollment_token_lives_in_a_0600_file_of_its_own(tmp_path: Path) -> None:
    """Case 8 (then the push token): a secret sat in appliance.toml, 0644. The push token is
    gone (issue 22: notices are mutual TLS); the enrollment token keeps the rule."""
    token = tmp_path / "enroll-token"
    token.write_text("adpop-enroll-s3cret.ab\n")
    token.chmod(0o644)
    path = tmp_path / "appliance.toml"
    path.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[sync]\norigin_url = "https://127.0.0.1:9"\n'
                    f'enrollment_token_file = "{token}"\n')
    agent = SyncAgent.from_config(cfg.load(cfg.Scope.APPLIANCE, path),
                                  SnapshotStore(tmp_path / "state"))
    with pytest.raises(secrets.SecretError) as refused:
        asyncio.run(agent._client_tls())
    assert refused.value.line() == (f"secret file {token} (sync.enrollment_token_file) is "
                                    f"readable by others (mode 0644) (hint: chmod 600 {token})")
    # The old push token setting is refused with the way out, not silently ignored.
    path.write_text('[sync]\npush_token_file = "/etc/adpop/push-token"\n')
    problems = [p.line() for p in cfg.check_files([path], cfg.Scope.APPLIANCE)]
    assert len(problems) == 1 and problems[0].startswith(
        f"{path}: sync.push_token_file: unknown key"), problems


def test_an_operators_rollback_inside_a_health_window_stands(world_factory: Any,
                                                             small: CampaignSet) -> None:
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()

            async def health() -> str:
                await roll_back(w.store, None, 1)  # the operator, mid-window
                return "engine serves v1, not v2"

            w.agent.health = health
            w.publish(2, campaigns(22))
            await w.agent.attempt()
            assert w.store.current_version() == 1 and w.store.pinned() == 1
            assert 2 not in w.store.rejected() and w.store.trial() is None
            assert w.agent.state.state == "pinned"
    run(scenario())


@pytest.mark.parametrize("mark_written", [True, False], ids=["mark-written", "mark-not-written"])
def test_a_version_stored_but_never_switched_to_is_taken_on_trial(
        world_factory: Any, small: CampaignSet, mark_written: bool) -> None:
    """A crash after storing, before the switch: the origin's offer of that version is not a
    rollback; it is activated from the store, on trial. Also when the crash came before its
    high-water mark was written (the outside run found a PoP stuck there)."""
    async def scenario() -> None:
        async with world_factory() as w:
            w.publish(1, small)
            await w.agent.attempt()
            built = w.publish(2, campaigns(22))
            w.store.add(2, built.manifest_bytes, built.payload)
            if not mark_written:
                w.store.high_water_path.write_text("1\n")
            assert w.store.current_version() == 1
            assert w.store.high_water() == (2 if mark_written else 1)
            await w.agent.attempt()
            assert w.store.current_version() == 2 and w.store.high_water() == 2
            assert not w.agent.state.refused
            assert w.agent.state.state == "active" and w.store.trial() is None
    run(scenario())
