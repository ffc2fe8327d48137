"""Signed manifests: what binds a payload to a version, a group, a lifetime and its signers.

A manifest file is canonical JSON (sorted keys, no spaces, ASCII): `{"signatures": [...],
"signed": {...}}`. Ed25519 signatures cover the canonical bytes of `signed`. A file that is not
exactly its own canonical form is refused, so no byte of it can change without detection.

Verification runs cheapest first and stops at the first failure: size cap, canonical form,
signatures (trusted keys pinned in config, each key counted once, threshold), schema, target
group, expiry, payload length (before reading), payload hash (before parsing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mmap
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.config import SnapshotSettings
from appliance.errors import AdpopError

MANIFEST_NAME = "manifest.json"
PAYLOAD_NAME = "payload.capnp"
FORMAT = "adpop-snapshot/1"


class KeyFileError(AdpopError):
    """A key file is missing, unreadable or not an Ed25519 key."""


class Reason(str, Enum):
    """Why a snapshot was refused; the value is the stable name in logs, metrics and reports."""

    TOO_LARGE = "too-large"
    MALFORMED = "malformed"
    SCHEMA_MISMATCH = "schema-mismatch"
    WRONG_GROUP = "wrong-group"
    UNKNOWN_KEY = "unknown-key"
    BAD_SIGNATURE = "bad-signature"
    THRESHOLD_NOT_MET = "threshold-not-met"
    EXPIRED = "expired"
    LENGTH_MISMATCH = "length-mismatch"
    HASH_MISMATCH = "hash-mismatch"
    ROLLBACK = "rollback"
    SLOW_RETRIEVAL = "slow-retrieval"
    CORRUPT_PAYLOAD = "corrupt-payload"
    OUT_OF_BOUNDS = "out-of-bounds"
    JUMP_HELD = "jump-held"
    UNREACHABLE = "origin-unreachable"
    NOT_LISTED = "not-listed"


class VerifyError(AdpopError):
    """A snapshot failed a check; `reason` names which."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}",
                         hint=_HINTS[reason])
        self.reason = reason


_HINTS = {
    Reason.TOO_LARGE: "raise snapshot.max_manifest_bytes/max_payload_bytes if it is expected",
    Reason.MALFORMED: "the file was altered or truncated; fetch or rebuild the snapshot",
    Reason.SCHEMA_MISMATCH: "build the snapshot with the same adpop release as this PoP",
    Reason.WRONG_GROUP: "publish it for this PoP's pop.target_group",
    Reason.UNKNOWN_KEY: "trust the signer: the origin's root.json (`adpop pop trust FILE`), or "
                        "its .pub for offline bundles (--trust)",
    Reason.BAD_SIGNATURE: "it was altered after signing, or signed by a key the trusted root "
                          "does not name; fetch it again, or rotate keys on the origin",
    Reason.THRESHOLD_NOT_MET: "sign with more trusted keys or lower --threshold",
    Reason.EXPIRED: "publish a fresh snapshot (or check this machine's clock)",
    Reason.LENGTH_MISMATCH: "the payload was truncated or altered; fetch it again",
    Reason.HASH_MISMATCH: "the payload was altered; fetch it again",
    Reason.ROLLBACK: "publish a version above this PoP's high-water mark",
    Reason.SLOW_RETRIEVAL: "check the origin's load and network; the next poll retries",
    Reason.CORRUPT_PAYLOAD: "rebuild the snapshot with `adpop origin publish`",
    Reason.OUT_OF_BOUNDS: "fix the campaigns and publish again",
    Reason.JUMP_HELD: "if the change is intended, publish with --allow-jump",
    Reason.UNREACHABLE: "check sync.origin_url and that the origin is running",
    Reason.NOT_LISTED: "only what the origin publishes is taken; publish it there",
}


def target_path(group: str, version: int) -> str:
    """The name under which the origin's TUF targets list a manifest."""
    return f"snapshots/{group}/{version}.manifest.json"


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value that is signed and stored."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    id: str
    private: Ed25519PrivateKey


def generate_key(out_dir: Path) -> tuple[Path, Path]:
    """Write a new key pair as `<keyid>.key` (0600, PKCS#8 PEM) and `<keyid>.pub` (PEM)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    kid = key_id(private.public_key())
    key_path, pub_path = out_dir / f"{kid}.key", out_dir / f"{kid}.pub"
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Created 0600 from the start: a private key must never exist readable by others.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_signing_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}",
                        hint="create one with `adpop keys generate --out DIR`") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key",
                        hint="create one with `adpop keys generate --out DIR`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key", hint="adpop signs with Ed25519 only")
    return SigningKey(key_id(key.public_key()), key)


def load_signing_keys(paths: Iterable[Path]) -> list[SigningKey]:
    """Signing keys from .key files and folders of them."""
    keys = []
    for path in paths:
        files = sorted(path.glob("*.key")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise KeyFileError(f"no .key files in signing key folder {path}",
                               hint="create one with `adpop origin keys init`")
        keys += [load_signing_key(f) for f in files]
    return keys


def load_trust(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by key id, from .pub files and folders of them."""
    trusted: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise KeyFileError(f"no .pub files in trust folder {path}",
                               hint="add the origin's public key with `adpop pop trust FILE`")
        for file in files:
            try:
                key = serialization.load_pem_public_key(file.read_bytes())
            except OSError as exc:
                raise KeyFileError(f"cannot read trusted key {file}: {exc.strerror}",
                                hint="check the --trust paths") from exc
            except ValueError as exc:
                raise KeyFileError(f"{file} is not a PEM public key",
                                hint="use the .pub written by `adpop keys generate`") from exc
            if not isinstance(key, Ed25519PublicKey):
                raise KeyFileError(f"{file} is not an Ed25519 key", hint="trust Ed25519 keys only")
            trusted[key_id(key)] = key
    return trusted


@dataclass(frozen=True)
class Manifest:
    """The signed fields of a manifest."""

    schema_id: str
    version: int
    created: int
    expires: int
    payload_sha256: str
    payload_length: int
    previous_sha256: str  # "" for the first snapshot
    target_group: str
    # The publisher vouches for a big change in campaign count or size (PoPs hold it otherwise).
    allow_jump: bool = False

    def signed(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"allow_jump": True} if self.allow_jump else {}
        return {**extra,
            "format": FORMAT,
            "schema_id": self.schema_id,
            "version": self.version,
            "created": self.created,
            "expires": self.expires,
            "payload": {"sha256": self.payload_sha256, "length": self.payload_length},
            "previous_sha256": self.previous_sha256,
            "target_group": self.target_group,
        }

    @classmethod
    def from_signed(cls, signed: Mapping[str, Any]) -> Manifest:
        """Parse the signed part; raises ValueError/KeyError/TypeError on a wrong shape."""
        payload = signed["payload"]
        fields = {
            "schema_id": signed["schema_id"], "version": signed["version"],
            "created": signed["created"], "expires": signed["expires"],
            "payload_sha256": payload["sha256"], "payload_length": payload["length"],
            "previous_sha256": signed["previous_sha256"], "target_group": signed["target_group"],
        }
        allow_jump = signed.get("allow_jump", False)
        if not isinstance(allow_jump, bool):
            raise TypeError("allow_jump must be true or false")
        ints = ("version", "created", "expires", "payload_length")
        for name, value in fields.items():
            want = int if name in ints else str
            if isinstance(value, bool) or not isinstance(value, want):
                raise TypeError(f"{name} must be {want.__name__}")
        if signed.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        if signed["version"] < 1 or payload["length"] < 0:
            raise ValueError("version and length must be positive")
        return cls(**fields, allow_jump=allow_jump)


def sign(manifest: Manifest, keys: Sequence[SigningKey]) -> bytes:
    """The manifest file bytes: `manifest` signed by each of `keys`."""
    body = canonical(manifest.signed())
    signatures = [
        {"keyid": k.id, "sig": base64.b64encode(k.private.sign(body)).decode()}
        for k in sorted(keys, key=lambda k: k.id)
    ]
    return canonical({"signatures": signatures, "signed": manifest.signed()})


@dataclass(frozen=True)
class Policy:
    """What a verifier insists on; built from the appliance configuration."""

    trusted: Mapping[str, Ed25519PublicKey]
    threshold: int = 1
    schema_id: str = ""
    target_group: str | None = None  # None: any group (offline tooling)
    # The limits' defaults are the settings' (appliance/config.py): one place.
    clock_skew: int = SnapshotSettings.clock_skew
    max_manifest_bytes: int = SnapshotSettings.max_manifest_bytes
    max_payload_bytes: int = SnapshotSettings.max_payload_bytes


def verify_manifest(data: bytes, policy: Policy, now: float | None = None, *,
                    vouched: bool = False) -> Manifest:
    """Check the manifest bytes; return its signed fields or raise VerifyError. `vouched`:
    the origin's TUF targets list these exact bytes (sync.trust checked it), which stands in
    for the manifest's own signatures; every other check still runs."""
    if len(data) > policy.max_manifest_bytes:
        raise VerifyError(Reason.TOO_LARGE,
                          f"manifest is {len(data)} bytes, limit {policy.max_manifest_bytes}")
    try:
        doc = json.loads(data)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise VerifyError(Reason.MALFORMED, f"manifest is not JSON ({exc})") from exc
    if not isinstance(doc, dict) or set(doc) != {"signatures", "signed"} \
            or not isinstance(doc["signed"], dict) or not isinstance(doc["signatures"], list):
        raise VerifyError(Reason.MALFORMED, "manifest needs exactly 'signed' and 'signatures'")
    try:
        if canonical(doc) != data:
            raise VerifyError(Reason.MALFORMED, "manifest is not in canonical form")
    except ValueError as exc:  # NaN/Infinity cannot be canonical
        raise VerifyError(Reason.MALFORMED, "manifest holds a non-finite number") from exc
    signed = doc["signed"]
    if not vouched:
        _check_signatures(canonical(signed), doc["signatures"], policy)
    if policy.schema_id and signed.get("schema_id") != policy.schema_id:
        raise VerifyError(Reason.SCHEMA_MISMATCH,
                          f"schema {signed.get('schema_id')!r}, this build reads "
                          f"{policy.schema_id}")
    try:
        manifest = Manifest.from_signed(signed)
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyError(Reason.MALFORMED, f"signed fields: {exc}") from exc
    if policy.target_group is not None and manifest.target_group != policy.target_group:
        raise VerifyError(Reason.WRONG_GROUP,
                          f"snapshot is for group {manifest.target_group!r}, this PoP serves "
                          f"{policy.target_group!r}")
    clock = time.time() if now is None else now
    if clock > manifest.expires + policy.clock_skew:
        raise VerifyError(Reason.EXPIRED, f"version {manifest.version} expired at "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(manifest.expires))}")
    if manifest.payload_length > policy.max_payload_bytes:
        raise VerifyError(Reason.TOO_LARGE, f"payload is {manifest.payload_length} bytes, "
                          f"limit {policy.max_payload_bytes}")
    return manifest


def _check_signatures(body: bytes, signatures: list[Any], policy: Policy) -> None:
    good: set[str] = set()
    unknown: list[str] = []
    bad: list[str] = []
    for entry in signatures:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str) \
                or not isinstance(entry.get("sig"), str):
            raise VerifyError(Reason.MALFORMED, "a signature entry needs 'keyid' and 'sig'")
        kid = entry["keyid"]
        key = policy.trusted.get(kid)
        if key is None:
            unknown.append(kid)
            continue
        try:
            key.verify(base64.b64decode(entry["sig"], validate=True), body)
        except (InvalidSignature, binascii.Error, ValueError):
            bad.append(kid)
            continue
        good.add(kid)  # a set: the same key signing twice counts once
    if len(good) >= policy.threshold:
        return
    # Name the most telling failure: a forged signature beats an unknown signer.
    if bad:
        raise VerifyError(Reason.BAD_SIGNATURE, f"signature by key {bad[0]} does not verify")
    if unknown and not good:
        raise VerifyError(Reason.UNKNOWN_KEY, f"signed by untrusted key {unknown[0]}")
    raise VerifyError(Reason.THRESHOLD_NOT_MET,
                      f"{len(good)} valid trusted signature(s), {policy.threshold} required")


def verify_payload(manifest: Manifest, path: Path) -> bytes:
    """Read the payload at `path` only if its length matches, then check its hash."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VerifyError(Reason.LENGTH_MISMATCH, f"payload unreadable: {exc.strerror}") from exc
    if size != manifest.payload_length:
        raise VerifyError(Reason.LENGTH_MISMATCH,
                          f"payload is {size} bytes, manifest says {manifest.payload_length}")
    data = path.read_bytes()
    verify_payload_bytes(manifest, data)
    return data


def verify_payload_bytes(manifest: Manifest, data: bytes | mmap.mmap) -> None:
    """Length, then SHA-256, of payload bytes (or a map of them)."""
    if len(data) != manifest.payload_length:
        raise VerifyError(Reason.LENGTH_MISMATCH,
                          f"payload is {len(data)} bytes, manifest says {manifest.payload_length}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.payload_sha256:
        raise VerifyError(Reason.HASH_MISMATCH,
                          f"payload sha256 {digest[:16]}…, manifest says "
                          f"{manifest.payload_sha256[:16]}…")


def verify_dir(folder: Path, policy: Policy, now: float | None = None
               ) -> tuple[Manifest, bytes]:
    """Verify `folder/manifest.json` and `folder/payload.capnp`; return both when good."""
    path = folder / MANIFEST_NAME
    try:
        size = path.stat().st_size
        if size > policy.max_manifest_bytes:
            raise VerifyError(Reason.TOO_LARGE,
                              f"manifest is {size} bytes, limit {policy.max_manifest_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise VerifyError(Reason.MALFORMED, f"cannot read {path}: {exc.strerror}") from exc
    manifest = verify_manifest(data, policy, now)
    return manifest, verify_payload(manifest, folder / PAYLOAD_NAME)
