"""Enrolling PoPs: one-time tokens an operator hands out, traded once for a certificate.

`token(...)` makes a token for a named PoP and group; only its SHA-256 is stored, so a copy of
the database enrolls nothing. `exchange(...)` takes a token and the public key the PoP made,
and answers the certificate and the CA's; the token is spent in the same transaction that
finds it. `revoke(...)` stops a PoP at once: its certificates are refused at the next request.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from appliance.config import identifier_fix, listen_addresses
from appliance.errors import AdpopError
from appliance.origin.ca import Authority, load_public_key, split
from appliance.origin.db import OriginDB

TOKEN_PREFIX = "adpop-enroll-"
DEFAULT_TTL = 24 * 3600


class EnrollError(AdpopError):
    """An enrollment was refused; the message says why and what to do."""


@dataclass(frozen=True)
class Enrolled:
    pop: str
    group: str
    certificate: bytes  # PEM
    ca: bytes  # PEM: what the PoP trusts the origin's TLS with from then on


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token(db: OriginDB, pop: str, group: str, ttl: float = DEFAULT_TTL,
          ca_fingerprint: str = "") -> str:
    """A new one-time token enrolling `pop` into `group`, valid for `ttl` seconds. After a
    dot it carries the CA's fingerprint: the PoP checks the origin against it before it
    sends the token anywhere."""
    for what, value in (("PoP name", pop), ("group", group)):
        fix = identifier_fix(value)
        if fix:
            raise EnrollError(f"{what} {value!r} is not usable", hint=fix)
    if ttl <= 0:
        raise EnrollError("the token's lifetime must be positive", hint="give --ttl 1h")
    made = TOKEN_PREFIX + secrets.token_urlsafe(32)
    db.add_enrollment(_digest(made), pop, group, time.time() + ttl)
    return f"{made}.{ca_fingerprint}" if ca_fingerprint else made


def push_address_fix(address: str) -> str | None:
    """The fix for an address the origin cannot push to (None when it can, or is "")."""
    if not address:
        return None
    try:
        ((host, _),) = listen_addresses(address)
    except ValueError as exc:
        return str(exc)
    if host in ("0.0.0.0", "::"):
        return (f"{address} is where the PoP listens, not where the origin reaches it; set "
                "sync.push_address to the PoP's reachable HOST:PORT")
    return None


def exchange(db: OriginDB, authority: Authority, presented: str, public_key_pem: bytes,
             push_address: str = "", now: float | None = None) -> Enrolled:
    """The certificate a token buys for a PoP's public key; raises EnrollError. The push
    notices of the PoP go to `push_address` (HOST:PORT, "": it polls only) for as long as
    the certificate lasts: no later request can move them."""
    key = load_public_key(public_key_pem)  # a bad key or address spends no token
    fix = push_address_fix(push_address)
    if fix:
        raise EnrollError(f"push address {push_address[:64]!r} is not usable", hint=fix)
    secret, _ = split(presented)
    issued: list[x509.Certificate] = []

    def issue(pop: str, group: str) -> tuple[int, float, str]:
        cert = authority.issue_pop(pop, group, key)
        issued.append(cert)
        return cert.serial_number, cert.not_valid_after_utc.timestamp(), push_address

    pop, group = db.take_enrollment(_digest(secret), time.time() if now is None else now, issue)
    return Enrolled(pop, group, issued[0].public_bytes(Encoding.PEM), authority.pem())


def revoke(db: OriginDB, pop: str) -> str:
    certs, tokens = db.revoke(pop)
    if not certs and not tokens:
        raise EnrollError(f"no PoP {pop!r} is enrolled or waiting to enroll",
                          hint="`adpop origin pops list` shows them")
    return f"{pop}: {certs} certificate(s) revoked, {tokens} unused token(s) dropped"
