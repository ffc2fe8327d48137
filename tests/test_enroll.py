"""PoP identity (issue 22, step 1, first part): the origin's private CA, one-time enrollment
tokens traded for a client certificate, and revocation. The certificate is shown to work for
mutual TLS with the real `ssl` module on loopback."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.errors import AdpopError
from appliance.origin import enroll
from appliance.origin.ca import Authority, CaError, identity, key_pem, new_key, public_pem
from appliance.origin.db import OriginDB
from appliance.origin.rollout import Plan
from appliance.origin.server import Origin

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def origin(tmp_path: Path) -> tuple[OriginDB, Authority]:
    return OriginDB(tmp_path / "origin"), Authority.open(tmp_path / "origin" / "ca")


@pytest.mark.unit
def test_the_ca_is_made_once_and_its_key_is_private(tmp_path: Path) -> None:
    first = Authority.open(tmp_path / "ca")
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = Authority.open(tmp_path / "ca")
    assert again.pem() == first.pem(), "a second start must not make a new CA"
    constraints = first.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca


@pytest.mark.unit
def test_a_token_buys_one_certificate_naming_the_pop_and_its_group(
        origin: tuple[OriginDB, Authority]) -> None:
    db, authority = origin
    made = enroll.token(db, "pop-fra-1", "eu")
    key = new_key()
    done = enroll.exchange(db, authority, made, public_pem(key))
    cert = x509.load_pem_x509_certificate(done.certificate)
    who = identity(cert)
    assert (who.pop, who.group) == ("pop-fra-1", "eu")
    assert authority.signed(cert)
    assert cert.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo) == \
        public_pem(key), "the certificate is for the key the PoP made"
    assert db.certificate_valid(who.serial)
    assert done.ca == authority.pem()
    with pytest.raises(AdpopError, match="used already"):
        enroll.exchange(db, authority, made, public_pem(new_key()))


@pytest.mark.unit
def test_tokens_expire_are_unguessable_and_only_their_digest_is_stored(
        origin: tuple[OriginDB, Authority], tmp_path: Path) -> None:
    db, authority = origin
    made = enroll.token(db, "pop-1", "default", ttl=60)
    with pytest.raises(AdpopError, match="expired"):
        enroll.exchange(db, authority, made, public_pem(new_key()), now=time.time() + 61)
    with pytest.raises(AdpopError, match="unknown enrollment token"):
        enroll.exchange(db, authority, made[:-1] + "x", public_pem(new_key()))
    assert made.encode() not in (tmp_path / "origin" / "origin.sqlite").read_bytes()


@pytest.mark.unit
@pytest.mark.parametrize("key", [b"not a key", "rsa"])
def test_a_bad_key_is_refused_and_spends_no_token(origin: tuple[OriginDB, Authority],
                                                  key: Any) -> None:
    db, authority = origin
    if key == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(
        ).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    made = enroll.token(db, "pop-1", "default")
    with pytest.raises(CaError):
        enroll.exchange(db, authority, made, key)
    assert enroll.exchange(db, authority, made, public_pem(new_key())).pop == "pop-1"


@pytest.mark.unit
@pytest.mark.parametrize("name", ["Pop One", "x" * 64, "", "../etc"])
def test_names_that_cannot_be_a_pop_id_are_refused(origin: tuple[OriginDB, Authority],
                                                   name: str) -> None:
    with pytest.raises(AdpopError, match="not usable"):
        enroll.token(origin[0], name, "default")


@pytest.mark.unit
def test_revoking_stops_certificates_and_waiting_tokens(
        origin: tuple[OriginDB, Authority]) -> None:
    db, authority = origin
    done = enroll.exchange(db, authority, enroll.token(db, "pop-1", "default"),
                           public_pem(new_key()))
    waiting = enroll.token(db, "pop-1", "default")
    serial = identity(x509.load_pem_x509_certificate(done.certificate)).serial
    assert "1 certificate(s) revoked, 1 unused token(s) dropped" in enroll.revoke(db, "pop-1")
    assert not db.certificate_valid(serial)
    with pytest.raises(AdpopError, match="unknown enrollment token"):
        enroll.exchange(db, authority, waiting, public_pem(new_key()))
    with pytest.raises(AdpopError, match="no PoP 'pop-2'"):
        enroll.revoke(db, "pop-2")


@pytest.mark.integration
def test_the_enroll_route_answers_a_certificate_once(origin: tuple[OriginDB, Authority]) -> None:
    db, authority = origin
    made = enroll.token(db, "pop-1", "default")

    async def scenario() -> None:
        server = Origin(db, Plan((), 25, 120), push_parallelism=2,
                        authority=authority)
        async with TestClient(TestServer(server.app())) as client:
            body = {"token": made, "public_key": public_pem(new_key()).decode()}
            first = await client.post("/v1/enroll", json=body)
            assert first.status == 200, await first.text()
            answer = await first.json()
            assert answer["pop"] == "pop-1" and "BEGIN CERTIFICATE" in answer["certificate"]
            again = await client.post("/v1/enroll", json=body)
            assert again.status == 403
            assert "used already" in (await again.json())["error"]["message"]
            missing = await client.post("/v1/enroll", json={"token": made})
            assert missing.status == 400
            bad = await client.post("/v1/enroll", json={**body, "public_key": "nope"})
            assert bad.status == 400 and (await bad.json())["error"]["code"] == "bad-key"

    asyncio.run(scenario())


@pytest.mark.integration
def test_the_certificate_works_for_mutual_tls(origin: tuple[OriginDB, Authority],
                                              tmp_path: Path) -> None:
    """A server that requires a client certificate from the CA accepts the enrolled PoP's
    and reads its name from it; a certificate from another CA is refused."""
    db, authority = origin
    pop_key = new_key()
    done = enroll.exchange(db, authority, enroll.token(db, "pop-1", "eu"), public_pem(pop_key))
    server_key, server_cert = authority.issue_server(["127.0.0.1"])
    files = {name: tmp_path / name for name in ("ca.pem", "server.key", "server.pem",
                                                 "pop.key", "pop.pem")}
    files["ca.pem"].write_bytes(authority.pem())
    files["server.key"].write_bytes(server_key)
    files["server.pem"].write_bytes(server_cert)
    files["pop.key"].write_bytes(key_pem(pop_key))
    files["pop.pem"].write_bytes(done.certificate)

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files["server.pem"], files["server.key"])
    server_ctx.load_verify_locations(files["ca.pem"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(identity(x509.load_der_x509_certificate(peer)).pop)
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    def client_ctx(cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=files["ca.pem"])
        ctx.load_cert_chain(cert, key)
        return ctx

    async def scenario() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(files["pop.pem"], files["pop.key"]))
        assert await reader.read() == b"ok"
        writer.close()
        # Another CA's certificate for the same name is refused in the handshake.
        stranger = Authority.open(tmp_path / "other-ca")
        other_key = new_key()
        forged = stranger.issue_pop("pop-1", "eu", other_key.public_key())
        (tmp_path / "forged.pem").write_bytes(forged.public_bytes(Encoding.PEM))
        (tmp_path / "forged.key").write_bytes(key_pem(other_key))
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port,
                ssl=client_ctx(tmp_path / "forged.pem", tmp_path / "forged.key"))
            # TLS 1.3: the client's side of the handshake ends first, and the server's
            # refusal arrives as an alert or the connection's end.
            answer = await reader.read()
        except (ssl.SSLError, ConnectionResetError):
            answer = b""
        assert answer == b"", "a certificate from another CA got an answer"
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
    assert seen == ["pop-1"]


@pytest.mark.integration
def test_the_cli_enrolls_lists_and_revokes(tmp_path: Path) -> None:
    def adpop(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "appliance.cli", "origin", *args,
                                 "--state", str(tmp_path / "o")], cwd=REPO,
                                capture_output=True, text=True, check=False)
        assert (result.returncode == 0) == ok, result.stderr
        return result

    made = adpop("pops", "enroll", "pop-a", "--group", "eu", "--ttl", "1h").stdout.strip()
    assert made.startswith(enroll.TOKEN_PREFIX) and "\n" not in made
    assert "waiting" in adpop("pops", "list").stdout
    db = OriginDB(tmp_path / "o")
    enroll.exchange(db, Authority.open(tmp_path / "o" / "ca"), made, public_pem(new_key()))
    assert "enrolled" in adpop("pops", "list").stdout
    assert "1 certificate(s) revoked" in adpop("pops", "revoke", "pop-a").stdout
    assert "revoked" in adpop("pops", "list").stdout
    bad = adpop("pops", "enroll", "Bad Name", ok=False)
    assert bad.stderr.startswith("adpop: error: PoP name 'Bad Name' is not usable")
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_a_pop_enrolls_itself_once_and_keeps_its_key_private(
        origin: tuple[OriginDB, Authority], tmp_path: Path) -> None:
    from appliance.sync.identity import Files, IdentityError
    from appliance.sync.identity import enroll as enroll_pop

    db, authority = origin
    made = enroll.token(db, "pop-7", "eu")
    folder = tmp_path / "pop" / "identity"

    async def scenario() -> None:
        server = Origin(db, Plan((), 25, 120), push_parallelism=2,
                        authority=authority)
        async with TestServer(server.app()) as test_server:
            url = str(test_server.make_url("")).rstrip("/")
            who = await enroll_pop(url, made, folder)
            assert (who.pop, who.group) == ("pop-7", "eu")
            # Started again, it keeps what it has and spends nothing.
            assert (await enroll_pop(url, made, folder)).serial == who.serial
            # Another PoP with the spent token gets a one-line refusal, and no certificate.
            with pytest.raises(IdentityError, match="used already"):
                await enroll_pop(url, made, tmp_path / "thief")
            assert not Files.under(tmp_path / "thief").cert.exists()

    asyncio.run(scenario())
    files = Files.under(folder)
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" not in files.cert.read_bytes() + files.ca.read_bytes()
    assert files.ca.read_bytes() == authority.pem()
