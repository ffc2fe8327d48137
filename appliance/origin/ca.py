"""The origin's private certificate authority: who a PoP is, proven by a certificate.

A PoP makes its own key pair (the private key never leaves it), presents a one-time
enrollment token with its public key, and gets a client certificate naming it (subject CN)
and its target group (subject OU), signed by this CA. The origin then takes a PoP's id and
group from the certificate of the connection, never from a URL or a body, and refuses a
certificate the database marks revoked.

Keys are ECDSA P-256: a TLS handshake signs with them, and P-256 signs about twelve times
faster than RSA-2048 on one core here. The CA key stays in the origin's state folder (0600).
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import secrets
from appliance.errors import AdpopError

CA_DAYS = 3650
LEAF_DAYS = 397  # what browsers accept for a server; PoPs re-enroll well within it
CA_NAME = "adpop origin CA"
# The subject of the certificate the origin shows when it pushes a notice to a PoP. It has a
# space, which no PoP id may have, so no enrolled PoP can pass for the origin.
ORIGIN_PUSH_NAME = "adpop origin push"
# A PoP's certificate also names it as a server, under this reserved top-level domain: the
# origin pushes to the address the PoP enrolled with and checks this name, so an address
# that some other PoP answers on fails the handshake.
POP_DOMAIN = "pops.adpop.invalid"


class CaError(AdpopError):
    """A key or certificate the CA was given, or its own files, cannot be used."""


@dataclass(frozen=True)
class Identity:
    """Who a client certificate says its holder is."""

    pop: str
    group: str
    serial: int  # the certificate's, checked against revocations


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """A PoP's public key as it presents it: PEM, ECDSA P-256 only."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise CaError("the public key is not PEM", hint="send the PEM of an ECDSA P-256 "
                      "public key (SubjectPublicKeyInfo)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CaError("the public key is not ECDSA P-256",
                      hint="make the PoP's key with ECDSA on the P-256 curve")
    return key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Authority:
    """The CA: its key and self-signed certificate."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def open(cls, folder: Path) -> Authority:
        """The CA kept in `folder` (ca.key 0600, ca.pem), made there the first time."""
        key_path, cert_path = folder / "ca.key", folder / "ca.pem"
        if not key_path.exists():
            # The certificate first and the key last, each written whole: a crash between
            # leaves no key, so the next start makes both again instead of a key without
            # its certificate.
            key = new_key()
            secrets.write(cert_path, cls._self_signed(key).public_bytes(
                serialization.Encoding.PEM).decode())
            secrets.write(key_path, key_pem(key).decode())
        try:
            loaded = serialization.load_pem_private_key(
                secrets.read(key_path, "the origin's CA key").encode() + b"\n", None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CaError(f"cannot load the origin's CA from {folder}: {exc}",
                          hint="restore ca.key and ca.pem from a backup; a new CA means "
                               "enrolling every PoP again") from exc
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CaError(f"{key_path} is not an ECDSA key", hint="restore it from a backup")
        return cls(loaded, cert)

    @staticmethod
    def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = _now()
        return (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (hex): what an enrollment token pins, so a PoP
        sends its token only to an origin that proves it holds this CA."""
        return fingerprint(self.cert)

    def _leaf(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
              usage: Sequence[x509.ObjectIdentifier],
              names: Sequence[x509.GeneralName] = ()) -> x509.Certificate:
        now = _now()
        builder = (x509.CertificateBuilder()
                   .subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                            critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_pop(self, pop: str, group: str, public_key: ec.EllipticCurvePublicKey
                  ) -> x509.Certificate:
        """The certificate of PoP `pop` of `group`, for the key it made itself: a client
        certificate towards the origin, and its push listener's server certificate (named
        pop_host(pop))."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pop),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, group)])
        return self._leaf(subject, public_key, (ExtendedKeyUsageOID.CLIENT_AUTH,
                                                ExtendedKeyUsageOID.SERVER_AUTH),
                          [x509.DNSName(pop_host(pop))])

    def issue_push_client(self) -> tuple[bytes, bytes]:
        """A key and certificate (both PEM) the origin pushes notices with: the only
        client a PoP's push listener takes."""
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ORIGIN_PUSH_NAME)])
        cert = self._leaf(subject, key.public_key(), (ExtendedKeyUsageOID.CLIENT_AUTH,))
        return key_pem(key), cert.public_bytes(serialization.Encoding.PEM)

    def issue_server(self, hosts: Sequence[str]) -> tuple[bytes, bytes]:
        """A key and certificate (both PEM) for the origin's own TLS on `hosts` (names or
        IP addresses): what tests and `make demo` serve with."""
        import ipaddress

        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        cert = self._leaf(subject, key.public_key(), (ExtendedKeyUsageOID.SERVER_AUTH,), names)
        return key_pem(key), cert.public_bytes(serialization.Encoding.PEM)

    def signed(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed `cert` (the TLS layer checks it too; this is for files)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def identity(cert: x509.Certificate) -> Identity:
    """The PoP a client certificate names; raises CaError when it names none."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cn) != 1 or len(ou) != 1:
        raise CaError("the certificate names no PoP (one CN and one OU expected)",
                      hint="enroll the PoP: `adpop origin pops enroll NAME`")
    return Identity(str(cn[0].value), str(ou[0].value), cert.serial_number)


def pop_host(pop: str) -> str:
    """The server name in PoP `pop`'s certificate."""
    return f"{pop}.{POP_DOMAIN}"


def is_origin(cert: x509.Certificate) -> bool:
    """Whether a certificate (already verified against the CA) is the origin's push
    certificate."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return len(cn) == 1 and cn[0].value == ORIGIN_PUSH_NAME


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def pinned_context(ca_pem: bytes, pinned: str) -> ssl.SSLContext | None:
    """A client context trusting the system's CAs (an origin with a public certificate) and
    the CA in `ca_pem` (fetched unverified), or None when that CA is not the one a token
    pins (SHA-256 `pinned`). Raises ValueError when `ca_pem` is no certificate."""
    if fingerprint(x509.load_pem_x509_certificate(ca_pem)) != pinned:
        return None
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=ca_pem.decode())
    return ctx


def split(token: str) -> tuple[str, str]:
    """An enrollment token's parts: (the secret, the CA fingerprint it pins or "")."""
    secret, _, pinned = token.partition(".")
    return secret, pinned
