"""The PoP's identity: its own key pair and the certificate the origin's CA gave it.

At its first start a PoP makes an ECDSA P-256 key (0600, never sent anywhere), presents its
one-time enrollment token with the public key to the origin's `POST /v1/enroll`, and keeps
the certificate and the CA certificate it gets back. Files, in `folder`:

- pop.key  the private key (0600)
- pop.pem  its certificate: the PoP's id (CN) and target group (OU), signed by the CA
- ca.pem   the origin's CA: what the PoP checks the origin's TLS against

The key is written before the request, so a crash between the two costs only the token (the
operator makes another); a certificate is written only whole (secrets.write), after it was
checked to be for this key and signed by the CA that came with it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import secrets
from appliance.errors import AdpopError
from appliance.origin.ca import (
    Identity,
    identity,
    key_pem,
    new_key,
    pinned_context,
    public_pem,
    split,
)

ENROLL_TIMEOUT = 30.0


class IdentityError(AdpopError):
    """This PoP has no usable identity, or the origin refused to give it one."""


@dataclass(frozen=True)
class Files:
    key: Path
    cert: Path
    ca: Path

    @classmethod
    def under(cls, folder: Path) -> Files:
        return cls(folder / "pop.key", folder / "pop.pem", folder / "ca.pem")

    def complete(self) -> bool:
        return self.key.is_file() and self.cert.is_file() and self.ca.is_file()


def load(files: Files) -> Identity:
    """Who the stored certificate says this PoP is; raises IdentityError."""
    try:
        return identity(x509.load_pem_x509_certificate(files.cert.read_bytes()))
    except (OSError, ValueError, AdpopError) as exc:
        raise IdentityError(f"no usable PoP certificate at {files.cert}: {exc}",
                            hint="enroll again with a new token from "
                                 "`adpop origin pops enroll NAME`") from exc


async def _pinned(session: ClientSession, base: str, token: str) -> ssl.SSLContext:
    """A TLS context trusting only the origin's CA, once its fingerprint is the one the
    token pins."""
    _, pinned = split(token)
    if not pinned:
        raise IdentityError("the enrollment token pins no CA, and the origin speaks TLS",
                            hint="make the token with `adpop origin pops enroll NAME` on "
                                 "this origin")
    # Unverified on purpose: what comes back is checked against the pin before any use.
    async with session.get(f"{base}/v1/ca", ssl=False) as resp:
        ca_pem = await resp.read()
    try:
        ctx = pinned_context(ca_pem, pinned)
    except ValueError as exc:
        raise IdentityError(f"{base} answered no CA certificate",
                            hint="check that sync.origin_url is this fleet's origin") from exc
    if ctx is None:
        raise IdentityError(f"the CA of {base} is not the one the enrollment token names",
                            hint="check sync.origin_url; the token was not sent")
    return ctx


def context(files: Files) -> ssl.SSLContext:
    """The PoP's client TLS: it shows its certificate and trusts the origin's CA (a
    private-ca origin) and the system's (an origin with a public certificate)."""
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    return ctx


def listener_context(files: Files) -> ssl.SSLContext:
    """The push listener's TLS: the PoP's certificate, and a client certificate from the
    origin's CA required (the notice handler then checks it is the origin's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def enroll(origin_url: str, token: str, folder: Path,
                 push_address: str = "") -> Identity:
    """Trades `token` for this PoP's certificate; returns the identity it names. The
    origin's push notices go to `push_address` (HOST:PORT, "": none) from then on. A PoP
    that has a certificate already keeps it (a token given again is not spent)."""
    files = Files.under(folder)
    if files.complete():
        return load(files)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not files.key.exists():
        secrets.write(files.key, key_pem(new_key()).decode())
    key = serialization.load_pem_private_key(
        secrets.read(files.key, "the PoP's private key").encode() + b"\n", None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{files.key} is not an ECDSA key",
                            hint=f"remove {files.key}; the next start makes a new one")
    mine = public_pem(key)
    body = {"token": token, "public_key": mine.decode(), "push_address": push_address}
    base = origin_url.rstrip("/")
    try:
        async with ClientSession(timeout=ClientTimeout(total=ENROLL_TIMEOUT)) as session:
            # Over TLS the token goes only to an origin whose certificate the pinned CA
            # signed: the CA is fetched first (public), checked against the token's pin,
            # and the enrollment request verifies the origin with it.
            tls = await _pinned(session, base, token) if base.startswith("https://") else None
            async with session.post(f"{base}/v1/enroll", json=body,
                                    ssl=tls if tls is not None else True) as resp:
                answer = await resp.json(content_type=None)
    except (ClientError, TimeoutError, ValueError, ssl.SSLError) as exc:
        raise IdentityError(f"origin {origin_url} not reachable to enroll: "
                            f"{exc or type(exc).__name__}",
                            hint="check sync.origin_url and that the origin runs") from exc
    if resp.status != 200 or not isinstance(answer, dict):
        message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
        raise IdentityError(f"the origin refused the enrollment: {message or resp.status}",
                            hint="make a new token with `adpop origin pops enroll NAME`")
    try:
        cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        ca = x509.load_pem_x509_certificate(str(answer["ca"]).encode())
        cert.verify_directly_issued_by(ca)
    except (KeyError, ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(f"the origin answered no usable certificate: {exc}",
                            hint="check that sync.origin_url is this fleet's origin") from exc
    if cert.public_key().public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) != mine:
        raise IdentityError("the origin's certificate is not for this PoP's key",
                            hint="check that sync.origin_url is this fleet's origin")
    # Whole and fsynced (secrets.write), the certificate last: it is what marks the identity
    # complete.
    secrets.write(files.ca, ca.public_bytes(serialization.Encoding.PEM).decode())
    secrets.write(files.cert, cert.public_bytes(serialization.Encoding.PEM).decode())
    return identity(cert)
