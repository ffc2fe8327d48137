"""The origin over TLS with PoP identities (issue 22, steps 1 and 5, part): a PoP enrolls with
its token, then syncs a signed snapshot over mutual TLS (the forged requests: test_forged.py).
Real TLS on loopback: the origin's own server, aiohttp clients and the PoP's SyncAgent."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from appliance import config as cfg
from appliance import httpguard
from appliance.origin import enroll
from appliance.origin.ca import Authority, key_pem, new_key, public_pem
from appliance.origin.db import OriginDB
from appliance.origin.publish import list_manifest
from appliance.origin.rollout import Plan
from appliance.origin.server import Origin, push_context, server_context
from appliance.origin.tuf_repo import Repository
from appliance.snapshot import bundle, synth
from appliance.snapshot.model import parse_documents
from appliance.snapshot.store import SnapshotStore
from appliance.sync import identity
from appliance.sync.agent import SyncAgent

pytestmark = pytest.mark.integration


@dataclass
class Tls:
    url: str
    db: OriginDB
    authority: Authority
    tmp: Path
    origin: Origin

    @property
    def repo(self) -> Repository:
        """The origin's TUF repository (where the origin serves /v1/tuf/ from)."""
        return Repository.open(self.db.state_dir / "tuf")

    def files(self, pop: str, group: str = "default", push_address: str = ""
              ) -> identity.Files:
        """A fresh key and certificate for `pop` from this origin's CA, as a PoP keeps them."""
        key = new_key()
        done = enroll.exchange(self.db, self.authority, enroll.token(self.db, pop, group),
                               public_pem(key), push_address)
        folder = self.tmp / f"client-{pop}-{len(list(self.tmp.glob('client-*')))}"
        folder.mkdir()
        (folder / "pop.key").write_bytes(key_pem(key))
        (folder / "pop.pem").write_bytes(done.certificate)
        (folder / "ca.pem").write_bytes(done.ca)
        return identity.Files.under(folder)

    def client(self, pop: str, group: str = "default") -> ssl.SSLContext:
        """A client context holding a fresh certificate for `pop` from this origin's CA."""
        return identity.context(self.files(pop, group))

    def anonymous(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.authority.pem().decode())


@asynccontextmanager
async def origin_over_tls(tmp: Path) -> AsyncIterator[Tls]:
    state = tmp / "origin"
    db, authority = OriginDB(state), Authority.open(state / "ca")
    settings = cfg.OriginSettings(state_dir=str(state), tls="private-ca")
    ctx = server_context(settings, authority)
    assert ctx is not None
    server = Origin(db, Plan((), 25, 120), push_parallelism=2, authority=authority,
                    push_tls=push_context(authority, state / "ca"))
    guard = httpguard.Guard(64)
    runner = web.AppRunner(server.app(guard), **httpguard.runner_kwargs())
    await runner.setup()
    listening = await httpguard.start(runner, guard, "127.0.0.1", 0, ctx)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield Tls(f"https://127.0.0.1:{port}", db, authority, tmp, server)
    finally:
        listening.close()
        await runner.cleanup()


def publish(tls: Tls, version: int) -> bundle.Bundle:
    """Version `version` stored and listed in the origin's TUF targets, as a publish does."""
    built = bundle.build(parse_documents(synth.generate(20, seed=version)), version, [],
                         ttl=86400, target_group="default", unsigned=True)
    tls.db.add_version(version, built.manifest_bytes, built.payload,
                       built.manifest.payload_sha256, 20, 0, "done",
                       vouch=lambda: list_manifest(tls.repo, built.manifest_bytes))
    return built


def test_a_pop_enrolls_and_syncs_over_mutual_tls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            publish(tls, 1)
            state = tmp_path / "pop"
            token_file = state / "enroll.token"
            state.mkdir()
            token_file.write_text(enroll.token(tls.db, "pop-1", "default",
                                               ca_fingerprint=tls.authority.fingerprint()))
            token_file.chmod(0o600)
            appliance = cfg.build(cfg.Scope.APPLIANCE, {
                ("paths", "state_dir"): str(state), ("sync", "origin_url"): tls.url,
                ("sync", "enrollment_token_file"): "enroll.token",
                ("snapshot", "trust_root"): str(tls.repo.metadata / "root.json"),
                ("sync", "health_window"): 0})
            agent = SyncAgent.from_config(appliance, SnapshotStore(state))
            stop = asyncio.Event()
            session = await agent._open_session(stop)
            assert session is not None, agent.state.origin_problem
            agent.session = session
            try:
                assert await agent.register(""), agent.state.origin_problem
                await agent.attempt()
                assert agent.store.current_version() == 1, agent.state.error
            finally:
                await session.close()
            assert [p.id for p in tls.db.pops()] == ["pop-1"]
            assert tls.db.pops()[0].version == 1, "the PoP reported over mutual TLS"

    asyncio.run(scenario())


def test_the_pop_sends_its_token_only_to_the_ca_it_pins(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            stranger = Authority.open(tmp_path / "stranger")
            made = enroll.token(tls.db, "pop-1", "default",
                                ca_fingerprint=stranger.fingerprint())
            with pytest.raises(identity.IdentityError, match="not the one the enrollment"):
                await identity.enroll(tls.url, made, tmp_path / "pop")
            # The token was not sent, so it still works with the right pin.
            secret = made.partition(".")[0]
            right = f"{secret}.{tls.authority.fingerprint()}"
            who = await identity.enroll(tls.url, right, tmp_path / "pop")
            assert who.pop == "pop-1"
            with pytest.raises(identity.IdentityError, match="pins no CA"):
                await identity.enroll(tls.url, secret, tmp_path / "other")

    asyncio.run(scenario())


def test_tls_from_files_needs_both_files(tmp_path: Path) -> None:
    path = tmp_path / "origin.toml"
    path.write_text('[origin]\ntls = "files"\ntls_cert = "server.pem"\n')
    (problem,) = cfg.check_files([path], cfg.Scope.ORIGIN)
    assert problem.key == "origin.tls_key" and "private-ca" in problem.fix
