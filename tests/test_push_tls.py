"""Push notices without a shared secret (issue 22, step 2): the origin pushes over TLS to the
address a PoP enrolled with, shows its push certificate, and checks the listener is that
PoP; the PoP takes a notice only from the origin's certificate. Real TLS on loopback."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import ClientOSError, ClientSession, ServerDisconnectedError, web

from appliance import config as cfg
from appliance import httpguard
from appliance.origin import enroll
from appliance.snapshot.store import SnapshotStore
from appliance.sync import identity
from appliance.sync.agent import SyncAgent
from appliance.up import free_port
from tests.test_origin_tls import Tls, origin_over_tls, publish
from tests.waiting import until

pytestmark = pytest.mark.integration


def _agent(tls: Tls, state: Path, push_port: int) -> SyncAgent:
    state.mkdir()
    token = state / "enroll-token"
    token.write_text(enroll.token(tls.db, "pop-1", "default",
                                  ca_fingerprint=tls.authority.fingerprint()))
    token.chmod(0o600)
    appliance = cfg.build(cfg.Scope.APPLIANCE, {
        ("paths", "state_dir"): str(state), ("sync", "origin_url"): tls.url,
        ("sync", "push_listen"): f"127.0.0.1:{push_port}",
        # Only a push can bring a new version within this test: the poll is an hour away.
        ("sync", "poll_interval"): 3600,
        ("snapshot", "trust_root"): str(tls.repo.metadata / "root.json"),
        ("snapshot", "max_jump_percent"): 0,
        ("sync", "health_window"): 0})
    return SyncAgent.from_config(appliance, SnapshotStore(state))


@asynccontextmanager
async def synced_pop(tls: Tls, state: Path, push_port: int) -> AsyncIterator[SyncAgent]:
    """A PoP enrolled and running its sync loop, on the origin's v1."""
    publish(tls, 1)
    agent = _agent(tls, state, push_port)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        await until("v1 by the first sync", lambda: agent.store.current_version() == 1)
        yield agent
    finally:
        stop.set()
        await running


def test_a_notice_reaches_the_enrolled_address_and_no_registration_moves_it(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            port = free_port()
            async with synced_pop(tls, tmp_path / "pop", port) as agent:
                (row,) = tls.db.pops()
                assert row.push_url == f"https://127.0.0.1:{port}"
                # The PoP itself cannot move its notices with a registration (nor can anyone
                # else: see the forged-request tests).
                async with ClientSession() as s:
                    resp = await s.post(f"{tls.url}/v1/pops/pop-1/register",
                                        json={"push_url": "https://198.18.0.9:1"},
                                        ssl=identity.context(identity.Files.under(
                                            tmp_path / "pop" / "identity")))
                    assert resp.status == 200
                assert tls.db.pops()[0].push_url == f"https://127.0.0.1:{port}"
                publish(tls, 2)
                await until("v2 by its push", lambda: agent.store.current_version() == 2,
                            timeout=20)

    asyncio.run(scenario())


def test_the_listener_takes_notices_only_from_the_origin(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            port = free_port()
            url = f"https://127.0.0.1:{port}/v1/notify"
            async with synced_pop(tls, tmp_path / "pop", port) as agent:
                listener_ca = ssl.create_default_context(
                    cafile=str(tmp_path / "pop" / "identity" / "ca.pem"))
                listener_ca.check_hostname = False  # the test checks the client side only
                another_pop = identity.context(tls.files("pop-2"))
                another_pop.check_hostname = False
                async with ClientSession() as s:
                    # No client certificate: the handshake fails.
                    with pytest.raises((ssl.SSLError, ClientOSError,
                                        ServerDisconnectedError)):
                        resp = await s.post(url, data=b"{}", ssl=listener_ca)
                        await resp.read()
                    # A certificate from the same CA, but a PoP's: refused.
                    resp = await s.post(url, data=b"{}", ssl=another_pop)
                    assert resp.status == 403
                    assert (await resp.json())["error"]["code"] == "not-the-origin"
                    # Plain HTTP to the TLS listener: no answer.
                    with pytest.raises((ServerDisconnectedError, ClientOSError)):
                        resp = await s.post(url.replace("https", "http"), data=b"{}")
                        await resp.read()
                assert agent.pushed is None and not agent.wake.is_set()

    asyncio.run(scenario())


def test_the_origin_pushes_only_to_the_pop_its_certificate_names(tmp_path: Path) -> None:
    """pop-1 enrolled at an address where pop-2's listener answers: the origin's handshake
    fails there and nothing is delivered."""

    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            hits: list[bytes] = []

            async def notify(request: web.Request) -> web.Response:
                hits.append(await request.read())
                return web.json_response({"ok": True}, status=202)

            app = web.Application()
            app.add_routes([web.post("/v1/notify", notify)])
            runner = web.AppRunner(app, **httpguard.runner_kwargs())
            await runner.setup()
            impostor = identity.listener_context(tls.files("pop-2"))
            listening = await httpguard.start(runner, httpguard.Guard(8), "127.0.0.1", 0,
                                              impostor)
            port = listening.sockets[0].getsockname()[1]
            try:
                await tls.origin._push("pop-1", f"https://127.0.0.1:{port}", 1)
                assert hits == []
                # The same listener is reached when it is pop-2 the origin pushes to.
                await tls.origin._push("pop-2", f"https://127.0.0.1:{port}", 1)
                assert len(hits) == 1
            finally:
                listening.close()
                await runner.cleanup()

    asyncio.run(scenario())
