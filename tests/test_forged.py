"""Forged requests against the origin (issue 22's acceptance): each is refused with 401 or
403, or its TLS handshake fails, and none changes anything the origin keeps (its refusals
of known operators are recorded in the audit log, which is the point of it).

The origin is the real server over real TLS on loopback, with an honest PoP, a revoked one,
one of another group, and operator tokens of each role."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientOSError, ClientSession, ServerDisconnectedError
from cryptography.hazmat.primitives.serialization import Encoding

from appliance.origin import enroll, ops
from appliance.origin.ca import Authority, key_pem, new_key, public_pem
from tests.test_origin_tls import Tls, origin_over_tls, publish

pytestmark = pytest.mark.integration

# What a forged request must not change: everything but the audit log.
KEPT = ("pops", "versions", "certificates", "enrollments", "operators", "documents", "paused")


def kept(tls: Tls) -> dict[str, list[Any]]:
    with sqlite3.connect(tls.db.state_dir / "origin.sqlite") as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in KEPT}


@dataclass
class Cast:
    """The origin's honest and dishonest callers."""

    honest: ssl.SSLContext  # pop-a, group default, registered
    revoked: ssl.SSLContext  # pop-r, registered, then revoked
    eu: ssl.SSLContext  # pop-eu, enrolled into group eu
    stranger: ssl.SSLContext  # a certificate for pop-a from another CA
    anonymous: ssl.SSLContext  # trusts the origin, shows no certificate
    tokens: dict[str, str] = field(default_factory=dict)  # operator name -> token
    used_token: str = ""  # an enrollment token spent already
    expired_token: str = ""
    sha256: str = ""  # the published payload


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def cast_for(tls: Tls, tmp: Path) -> Cast:
    built = publish(tls, 1)
    stranger_ca = Authority.open(tmp / "stranger")
    other = new_key()
    forged = stranger_ca.issue_pop("pop-a", "default", other.public_key())
    (tmp / "forged.pem").write_bytes(forged.public_bytes(Encoding.PEM))
    (tmp / "forged.key").write_bytes(key_pem(other))
    stranger = tls.anonymous()
    stranger.load_cert_chain(tmp / "forged.pem", tmp / "forged.key")
    cast = Cast(tls.client("pop-a"), tls.client("pop-r"), tls.client("pop-eu", "eu"),
                stranger, tls.anonymous(), sha256=built.manifest.payload_sha256)
    async with ClientSession() as s:
        for ctx, pop in ((cast.honest, "pop-a"), (cast.revoked, "pop-r"), (cast.eu, "pop-eu")):
            resp = await s.post(f"{tls.url}/v1/pops/{pop}/register", json={}, ssl=ctx)
            assert resp.status == 200, await resp.text()
    enroll.revoke(tls.db, "pop-r")
    for name, role in (("looker", "read"), ("pub", "publish"), ("boss", "admin"),
                       ("gone", "admin")):
        cast.tokens[name] = ops.new_token(tls.db, name, role, tls.authority.fingerprint())
    tls.db.revoke_operator("gone")
    cast.used_token = enroll.token(tls.db, "pop-u", "default")
    enroll.exchange(tls.db, tls.authority, cast.used_token, public_pem(new_key()))
    cast.expired_token = enroll.token(tls.db, "pop-x", "default", ttl=0.01)
    await asyncio.sleep(0.05)
    return cast


def attempts(c: Cast) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """name -> (method, path, request arguments)."""
    key = public_pem(new_key()).decode()
    t = c.tokens
    return {
        # PoPs without the right certificate
        "no certificate: manifest": ("GET", "/v1/manifest?pop=pop-a", {"ssl": c.anonymous}),
        "no certificate: payload": ("GET", f"/v1/payload/{c.sha256}", {"ssl": c.anonymous}),
        "no certificate: register, redirecting pushes": (
            "POST", "/v1/pops/pop-a/register",
            {"ssl": c.anonymous, "json": {"push_url": "https://198.18.0.9:1"}}),
        "no certificate: status halting a rollout": (
            "POST", "/v1/pops/pop-a/status",
            {"ssl": c.anonymous, "json": {"version": 1, "state": "failed",
                                          "failed_version": 1, "error": "forged"}}),
        "another CA's certificate for pop-a": (
            "POST", "/v1/pops/pop-a/status", {"ssl": c.stranger, "json": {"version": 999}}),
        "revoked PoP: status": ("POST", "/v1/pops/pop-r/status",
                                {"ssl": c.revoked, "json": {"version": 999}}),
        "revoked PoP: manifest": ("GET", "/v1/manifest", {"ssl": c.revoked}),
        "revoked PoP: payload": ("GET", f"/v1/payload/{c.sha256}", {"ssl": c.revoked}),
        "another PoP's id: status (version 999)": (
            "POST", "/v1/pops/pop-eu/status", {"ssl": c.honest, "json": {"version": 999}}),
        "another PoP's id: register": (
            "POST", "/v1/pops/pop-eu/register",
            {"ssl": c.honest, "json": {"push_url": "https://198.18.0.9:1"}}),
        "a 4,000-character id": ("POST", f"/v1/pops/{'x' * 4000}/status",
                                 {"ssl": c.honest, "json": {"version": 1}}),
        "a PoP claiming another group": (
            "POST", "/v1/pops/pop-a/register",
            {"ssl": c.honest, "json": {"target_group": "eu"}}),
        "a PoP of group eu fetching group default's payload": (
            "GET", f"/v1/payload/{c.sha256}", {"ssl": c.eu}),
        # Enrollment
        "stolen enrollment token, used already": (
            "POST", "/v1/enroll", {"ssl": c.anonymous,
                                   "json": {"token": c.used_token, "public_key": key}}),
        "expired enrollment token": (
            "POST", "/v1/enroll", {"ssl": c.anonymous,
                                   "json": {"token": c.expired_token, "public_key": key}}),
        "made-up enrollment token": (
            "POST", "/v1/enroll", {"ssl": c.anonymous, "json": {
                "token": enroll.TOKEN_PREFIX + "x" * 43, "public_key": key}}),
        # Operators
        "no operator token: fleet": ("GET", "/v1/fleet", {"ssl": c.anonymous}),
        "no operator token: publish": ("POST", "/v1/ops/publish", {"ssl": c.anonymous}),
        "a PoP's certificate as an operator: fleet": ("GET", "/v1/fleet", {"ssl": c.honest}),
        "made-up operator token": ("POST", "/v1/ops/publish", {
            "ssl": c.anonymous, "headers": bearer(ops.TOKEN_PREFIX + "y" * 43)}),
        "revoked operator token": ("POST", "/v1/ops/tokens/evil", {
            "ssl": c.anonymous, "headers": bearer(t["gone"]), "json": {"role": "admin"}}),
        "read token: publish": ("POST", "/v1/ops/publish",
                                {"ssl": c.anonymous, "headers": bearer(t["looker"])}),
        "read token: campaign import": (
            "POST", "/v1/ops/campaigns", {"ssl": c.anonymous, "headers": bearer(t["looker"]),
                                          "json": {"documents": {"x.json": {}}}}),
        "read token: pause": ("POST", "/v1/ops/campaigns/c1/pause",
                              {"ssl": c.anonymous, "headers": bearer(t["looker"])}),
        "read token: rollout halt": ("POST", "/v1/ops/rollout/1/halt",
                                     {"ssl": c.anonymous, "headers": bearer(t["looker"])}),
        "read token: rollout release": ("POST", "/v1/ops/rollout/1/release",
                                        {"ssl": c.anonymous, "headers": bearer(t["looker"])}),
        "publish token: enroll a PoP": (
            "POST", "/v1/ops/pops/pop-evil/enroll",
            {"ssl": c.anonymous, "headers": bearer(t["pub"]), "json": {}}),
        "publish token: revoke a PoP": ("POST", "/v1/ops/pops/pop-a/revoke",
                                        {"ssl": c.anonymous, "headers": bearer(t["pub"])}),
        "publish token: make an admin token": (
            "POST", "/v1/ops/tokens/evil",
            {"ssl": c.anonymous, "headers": bearer(t["pub"]), "json": {"role": "admin"}}),
        "publish token: revoke the admin's token": (
            "POST", "/v1/ops/tokens/boss/revoke",
            {"ssl": c.anonymous, "headers": bearer(t["pub"])}),
        "publish token: read the audit log": ("GET", "/v1/ops/audit",
                                              {"ssl": c.anonymous, "headers": bearer(t["pub"])}),
        "an operator token on a PoP route": (
            "POST", "/v1/pops/pop-a/status",
            {"ssl": c.anonymous, "headers": bearer(t["boss"]), "json": {"version": 999}}),
    }


def test_forged_requests_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with origin_over_tls(tmp_path) as tls:
            cast = await cast_for(tls, tmp_path)
            before = kept(tls)
            table = attempts(cast)
            assert len(table) >= 25
            refused: dict[str, str] = {}
            async with ClientSession() as s:
                for what, (method, path, kwargs) in table.items():
                    try:
                        async with s.request(method, f"{tls.url}{path}", **kwargs) as resp:
                            body = await resp.text()
                            refused[what] = str(resp.status)
                            assert resp.status in (401, 403), (what, resp.status, body)
                            assert resp.headers["Strict-Transport-Security"]
                            assert json.loads(body)["error"]["message"], what
                    except (ssl.SSLError, ClientOSError, ServerDisconnectedError):
                        refused[what] = "handshake refused"
                    assert kept(tls) == before, f"{what} changed the origin's state"
                # Plain HTTP to the TLS port: no answer at all.
                plain = tls.url.replace("https://", "http://")
                with pytest.raises((ServerDisconnectedError, ClientOSError)):
                    async with s.post(f"{plain}/v1/pops/pop-a/status",
                                      json={"version": 7}) as resp:
                        await resp.read()
            assert refused["another CA's certificate for pop-a"] == "handshake refused"
            assert sum(1 for r in refused.values() if r in ("401", "403")) >= 25, refused
            assert kept(tls) == before
            # Known operators' refused writes are on record, with who tried.
            audit = tls.db.audit()
            assert {(op, action) for _, op, action, _, outcome in audit
                    if outcome.startswith("refused")} >= {
                ("looker", "publish"), ("pub", "tokens.create"), ("pub", "pops.revoke")}

            # The same requests done right are answered (the refusals were not blanket).
            async with ClientSession() as s:
                ok = await s.get(f"{tls.url}/v1/fleet", ssl=cast.anonymous,
                                 headers=bearer(cast.tokens["looker"]))
                assert ok.status == 200 and len((await ok.json())["pops"]) == 3
                mine = await s.get(f"{tls.url}/v1/payload/{cast.sha256}", ssl=cast.honest)
                assert mine.status == 200
                made = await s.post(f"{tls.url}/v1/ops/pops/pop-new/enroll", json={},
                                    ssl=cast.anonymous, headers=bearer(cast.tokens["boss"]))
                assert made.status == 200
                assert (await made.json())["token"].startswith(enroll.TOKEN_PREFIX)
            assert [a[2:] for a in tls.db.audit()][-1][:1] == ("pops.enroll",)

    asyncio.run(scenario())
