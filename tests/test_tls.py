"""The supervisor trusts the system CAs through their hashed directory, not the bundle:
the same CAs verify, an unknown one does not, and aiohttp's import parses no bundle."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.tls import NO_BUNDLE, trust_directory_only
from appliance.up import free_port

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(work: Path, name: str) -> tuple[Path, Path]:
    """A CA and a certificate it signed for 127.0.0.1: (ca.pem, server.pem with its key)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem", "-days", "2",
            "-subj", f"/CN=adpop test CA {name}", cwd=work)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=127.0.0.1", cwd=work)
    (work / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem", "-CAkey",
            f"{name}-ca.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
            "-extfile", f"{name}.ext", cwd=work)
    server = work / f"{name}-server.pem"
    server.write_text((work / f"{name}.crt").read_text() + (work / f"{name}.key").read_text())
    return work / f"{name}-ca.pem", server


@contextlib.contextmanager
def serve_tls(certificate: Path) -> Iterator[int]:
    """A TLS listener on 127.0.0.1 that completes handshakes and closes."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate)
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused our certificate

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.fixture
def trusted_and_not(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A hashed CA directory with CA "good" in it, and listeners for a "good" and a "bad"
    certificate."""
    good_ca, good = make_ca(tmp_path, "good")
    _, bad = make_ca(tmp_path, "bad")
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "good-ca.pem").write_text(good_ca.read_text())
    openssl("rehash", str(directory), cwd=tmp_path)
    with serve_tls(good) as good_port, serve_tls(bad) as bad_port:
        yield directory, good_port, bad_port


CLIENT = """
import asyncio, os, ssl, sys
from appliance.tls import trust_directory_only
assert trust_directory_only(directory=sys.argv[1])
os.environ["SSL_CERT_DIR"] = sys.argv[1]  # stands for OpenSSL's default directory
import aiohttp, aiohttp.connector
bundle_cas = aiohttp.connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"]
async def handshake(port):
    try:
        await asyncio.open_connection("127.0.0.1", int(port),
                                      ssl=aiohttp.connector._SSL_CONTEXT_VERIFIED)
        return "verified"
    except ssl.SSLCertVerificationError:
        return "refused"
print(bundle_cas, *[asyncio.run(handshake(p)) for p in sys.argv[2:]])
"""


def test_the_directory_alone_verifies_what_it_holds(trusted_and_not: tuple[Path, int, int]
                                                    ) -> None:
    directory, good, bad = trusted_and_not
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_CERT_")}
    result = subprocess.run([sys.executable, "-c", CLIENT, str(directory), str(good), str(bad)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    # No CA parsed up front, the one in the directory verifies, an unknown one does not.
    assert result.stdout.split() == ["0", "verified", "refused"]


def test_only_where_the_directory_is_hashed_and_nothing_was_chosen(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    assert not trust_directory_only(environ, directory=str(tmp_path))  # no hashed certs
    assert environ == {}
    (tmp_path / "1a2b3c4d.0").write_text("")
    assert trust_directory_only(environ, directory=str(tmp_path))
    assert environ == {"SSL_CERT_FILE": str(tmp_path / NO_BUNDLE)}
    assert not (tmp_path / NO_BUNDLE).exists()
    for chosen in ({"SSL_CERT_FILE": "/etc/site.pem"}, {"SSL_CERT_DIR": "/etc/site"}):
        assert not trust_directory_only(dict(chosen), directory=str(tmp_path))
