"""The origin's TUF repository (The Update Framework, python-tuf's metadata API): what the fleet
trusts, and how that trust is rotated without touching a PoP.

Roles and keys (Ed25519, one file each under `<origin state>/tuf/keys/`, mode 0600):
- root: a threshold of keys (default 2 of 3) meant to live offline; it names every role's
  keys. A new root is signed by a threshold of the old root's keys and of its own: PoPs
  follow a chain of roots, each vouched for by the one before.
- targets: signs what PoPs may take (today snapshot manifests; later appliance images).
- snapshot and timestamp: online, short-lived, re-signed by `adpop origin serve`: a PoP
  that is fed old metadata (a freeze) or metadata of different moments (mix and match) finds
  out from them.

Files under `metadata/` are what the API serves at /v1/tuf/: `N.root.json` for each root
version, `N.targets.json` and `N.snapshot.json` (consistent snapshots: never overwritten),
and `timestamp.json`. A root waiting for offline signatures is kept in `staged/root.json`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer._crypto_signer import CryptoSigner

# The classes' home module: tuf.api.metadata re-exports them without __all__ (mypy).
from tuf.api._payload import (
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from appliance import secrets
from appliance.durable import write_file
from appliance.errors import AdpopError

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE = ("snapshot", "timestamp")
# How long each role's metadata is good for. Timestamp and snapshot are re-signed by the
# running origin when half of that is gone; targets at each publish; root at each rotation.
LIFETIME = {"root": 365 * 86400, "targets": 365 * 86400, "snapshot": 7 * 86400,
            "timestamp": 86400}
_JSON = JSONSerializer(compact=False)
MAX_TARGETS = 1000  # entries listed at once, the newest (about 300 bytes each)


class TufError(AdpopError):
    """The repository cannot do what was asked (a missing key, a threshold not met)."""


def _expiry(role: str, now: float) -> datetime:
    return (datetime.fromtimestamp(now, UTC) + timedelta(seconds=LIFETIME[role])).replace(
        microsecond=0)


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a PoP never reads half a metadata file."""
    write_file(path, data)


class Repository:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metadata = folder / "metadata"
        self.keys = folder / "keys"
        self.staged = folder / "staged" / "root.json"

    # --- set-up ---------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path, root_keys: int = 3, root_threshold: int = 2,
             now: float | None = None) -> Repository:
        """The repository in `folder`, made there the first time (every key, and version 1
        of each role's metadata)."""
        repo = cls(folder)
        if (repo.metadata / "1.root.json").exists():
            return repo
        if not 1 <= root_threshold <= root_keys:
            raise TufError(f"a root threshold of {root_threshold} with {root_keys} keys",
                           hint="give at least as many root keys as the threshold")
        clock = time.time() if now is None else now
        repo.metadata.mkdir(parents=True, exist_ok=True)
        root = Root(expires=_expiry("root", clock), consistent_snapshot=True)
        for role in ROLES:
            for _ in range(root_keys if role == "root" else 1):
                root.add_key(repo._new_key(role).public_key, role)
        root.roles["root"].threshold = root_threshold
        md_root = Metadata(root)
        for signer in repo._signers("root", root.roles["root"].keyids):
            md_root.sign(signer, append=True)
        targets = Metadata(Targets(expires=_expiry("targets", clock)))
        targets.sign(repo._signer_for(root, "targets"))
        repo._save(targets)
        repo._save_online(root, targets.signed.version, clock)
        repo._save(md_root)  # last: its presence marks the repository complete
        return repo

    def _new_key(self, role: str) -> CryptoSigner:
        signer = CryptoSigner(Ed25519PrivateKey.generate())
        self.keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        secrets.write(self.keys / f"{role}-{signer.public_key.keyid[:16]}.key",
                      signer.private_bytes.decode())
        return signer

    def _key_files(self, role: str) -> Iterable[Path]:
        return sorted(self.keys.glob(f"{role}-*.key")) if self.keys.is_dir() else []

    @staticmethod
    def load_signer(path: Path) -> CryptoSigner:
        try:
            key = load_pem_private_key(secrets.read(path, "a TUF key").encode() + b"\n", None)
        except (OSError, ValueError, secrets.SecretError) as exc:
            raise TufError(f"{path} is not a PEM private key: {exc}",
                           hint="give the .key file the repository made") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise TufError(f"{path} is not an Ed25519 key", hint="give an Ed25519 key")
        return CryptoSigner(key)

    def _signers(self, role: str, keyids: Iterable[str]) -> list[CryptoSigner]:
        wanted = set(keyids)
        found = [self.load_signer(p) for p in self._key_files(role)]
        return [s for s in found if s.public_key.keyid in wanted]

    def _signer_for(self, root: Root, role: str) -> CryptoSigner:
        found = self._signers(role, root.roles[role].keyids)
        if not found:
            raise TufError(f"no key of the {role} role is in {self.keys}",
                           hint=f"restore it, or make a new one: `adpop origin keys rotate "
                                f"{role}`")
        return found[0]

    # --- reading and writing metadata -------------------------------------------------

    def load(self, role: str) -> Metadata[Any]:
        name = "timestamp.json" if role == "timestamp" else f"{role}.json"
        try:
            return Metadata.from_bytes((self.metadata / name).read_bytes())
        except (OSError, ValueError) as exc:
            raise TufError(f"cannot read the repository's {role} metadata: {exc}",
                           hint=f"restore {self.metadata} from a backup") from exc

    def root(self) -> Root:
        return cast(Root, self.load("root").signed)

    def root_bytes(self) -> bytes:
        """The current root.json: what a PoP is given to trust (image or `adpop flash`)."""
        return (self.metadata / "root.json").read_bytes()

    def _save(self, md: Metadata[Any]) -> None:
        signed: Signed = md.signed
        data = md.to_bytes(_JSON)
        role = signed.type
        if role != "timestamp":
            _write(self.metadata / f"{signed.version}.{role}.json", data)
        _write(self.metadata / ("timestamp.json" if role == "timestamp" else f"{role}.json"),
               data)

    def _save_online(self, root: Root, targets_version: int, now: float) -> None:
        """New snapshot and timestamp metadata naming `targets_version`."""
        try:
            old_snapshot = self.load("snapshot").signed.version
            old_timestamp = self.load("timestamp").signed.version
        except TufError:
            old_snapshot = old_timestamp = 0
        snapshot = Metadata(Snapshot(version=old_snapshot + 1, expires=_expiry("snapshot", now),
                                     meta={"targets.json": MetaFile(targets_version)}))
        snapshot.sign(self._signer_for(root, "snapshot"))
        self._save(snapshot)
        timestamp = Metadata(Timestamp(version=old_timestamp + 1,
                                       expires=_expiry("timestamp", now),
                                       snapshot_meta=MetaFile(snapshot.signed.version)))
        timestamp.sign(self._signer_for(root, "timestamp"))
        self._save(timestamp)

    def online_signer(self) -> CryptoSigner:
        """The timestamp role's key: online, and what PoPs check fleet allowances against
        (appliance/origin/pacing.py)."""
        return self._signer_for(self.root(), "timestamp")

    # --- what the origin does -------------------------------------------------------------

    def add_target(self, path: str, length: int, sha256: str, custom: dict[str, Any],
                   now: float | None = None) -> int:
        """Lists `path` as a target with its length, hash and custom fields (signed by the
        targets key), then new snapshot and timestamp; returns the targets version."""
        clock = time.time() if now is None else now
        return self._next_targets(self.root(), clock, TargetFile(
            length, {"sha256": sha256}, path, {"custom": custom}))

    def _next_targets(self, root: Root, now: float, add: TargetFile | None = None) -> int:
        """The next targets version (with `add` listed), signed by the key `root` names,
        then new snapshot and timestamp; returns the targets version."""
        targets = cast(Metadata[Targets], self.load("targets"))
        if add is not None:
            listed = targets.signed.targets
            listed[add.path] = add
            # PoPs take recent versions only (older ones they keep are in their stores): the
            # oldest go, so the targets file stays far below what clients accept (5 MB).
            for path in list(listed)[:max(0, len(listed) - MAX_TARGETS)]:
                del listed[path]
        targets.signed.version += 1
        targets.signed.expires = _expiry("targets", now)
        targets.signatures.clear()
        targets.sign(self._signer_for(root, "targets"))
        self._save(targets)
        self._save_online(root, targets.signed.version, now)
        return targets.signed.version

    def refresh_online(self, now: float | None = None) -> bool:
        """Re-signs snapshot and timestamp once half their life is gone; whether it did."""
        clock = time.time() if now is None else now
        for role in ONLINE:
            expires = self.load(role).signed.expires.timestamp()
            if expires - clock < LIFETIME[role] / 2:
                self._save_online(self.root(), self.load("targets").signed.version, clock)
                return True
        return False

    # --- rotation ---------------------------------------------------------------------

    def rotate(self, role: str, now: float | None = None) -> str:
        """Replaces `role`'s keys with new ones in the next root version (the old ones are
        revoked there), signed with every root key this origin holds; returns what was done
        and what is left to do."""
        if role not in ROLES:
            raise TufError(f"no role {role!r}", hint=f"use one of {', '.join(ROLES)}")
        clock = time.time() if now is None else now
        current = self.root()
        new = copy.deepcopy(current)  # from_dict(to_dict()) would share the key lists
        new.version += 1
        new.expires = _expiry("root", clock)
        retired = list(current.roles[role].keyids)
        for keyid in retired:
            new.revoke_key(keyid, role)
        for _ in retired:
            new.add_key(self._new_key(role).public_key, role)
        staged = Metadata(new)
        self.staged.parent.mkdir(parents=True, exist_ok=True)
        _write(self.staged, staged.to_bytes(_JSON))
        # The old root keys sign too (a new root needs them), then the old keys retire.
        signers = self._signers("root", {*current.roles["root"].keyids,
                                         *new.roles["root"].keyids})
        for keyid in retired:
            for path in self._key_files(role):
                if path.name == f"{role}-{keyid[:16]}.key":
                    path.rename(path.with_suffix(".retired"))
        return self._sign_staged(signers, clock)

    def sign_root(self, key: Path, now: float | None = None) -> str:
        """Adds the signature of root key file `key` (kept offline) to the staged root."""
        if not self.staged.exists():
            raise TufError("no root is waiting for signatures",
                           hint="`adpop origin keys rotate ROLE` stages one")
        return self._sign_staged([self.load_signer(key)], time.time() if now is None else now)

    def _sign_staged(self, signers: list[CryptoSigner], now: float) -> str:
        staged = cast(Metadata[Root], Metadata.from_bytes(self.staged.read_bytes()))
        current = self.root()
        for signer in signers:
            if signer.public_key.keyid in {*current.roles["root"].keyids,
                                            *staged.signed.roles["root"].keyids}:
                staged.sign(signer, append=True)
        _write(self.staged, staged.to_bytes(_JSON))
        body = staged.signed_bytes
        try:
            current.verify_delegate("root", body, staged.signatures)
            staged.signed.verify_delegate("root", body, staged.signatures)
        except UnsignedMetadataError:
            have = len(staged.signatures)
            return (f"root v{staged.signed.version} staged with {have} signature(s); it needs "
                    f"{current.roles['root'].threshold} of the old root keys and "
                    f"{staged.signed.roles['root'].threshold} of the new: sign with "
                    "`adpop origin root sign --key FILE`")
        self._save(staged)
        self.staged.unlink()
        # Each role signs anew with the keys the new root names; PoPs refuse the old ones.
        self._next_targets(staged.signed, now)
        return (f"root v{staged.signed.version} in force; targets, snapshot and timestamp "
                "signed anew")
