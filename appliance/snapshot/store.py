"""The PoP's versioned snapshot store.

Layout under the state directory:

    snapshots/<version>/manifest.json
    snapshots/<version>/payload.capnp
    current -> snapshots/<version>      (relative symlink, switched atomically)
    high-water                          (highest version ever accepted; refuses replays)
    trial                               (the version on trial and the one before it)
    rejected                            (versions that failed their health window)
    quarantine/<version>-<unix ns>/     (versions whose files failed their hash)

Crash safety: a version directory appears under its final name only by rename of a complete,
fsynced temporary directory; `current` is switched by renaming a new symlink over it, then the
parent directory is fsynced. Whatever moment the process dies, `current` names a complete
snapshot (the old one or the new one). Leftover temporaries are removed on open.

A version taken from the origin is on trial until its health window completes: `trial` is
written before `current` switches and removed once the window passed, so a version whose
window a crash interrupted is known as unproven at the next start.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.durable import fsync_dir
from appliance.errors import AdpopError
from appliance.snapshot import CURRENT_LINK
from appliance.snapshot.manifest import (
    MANIFEST_NAME,
    PAYLOAD_NAME,
    Manifest,
    Reason,
    VerifyError,
    verify_payload_bytes,
)

_TMP_PREFIX = ".tmp-"
QUARANTINE_KEEP = 3  # quarantined versions kept for a look; older ones are removed


class StoreError(AdpopError):
    """The store refused an operation (stale version, unknown version, unwritable disk)."""


class StaleVersionError(StoreError):
    """The version is not above the persisted high-water mark (replay or rollback attack)."""


@dataclass(frozen=True)
class StoredSnapshot:
    version: int
    path: Path
    active: bool


@dataclass(frozen=True)
class Trial:
    """A version activated and not yet proven by its health window."""

    version: int
    previous: int | None  # what to go back to when it fails
    tries: int  # windows started for it (a crash inside one makes the next start a retry)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class SnapshotStore:
    """Versioned snapshots with an atomic `current` link; see the module docstring."""

    def __init__(self, root: Path, keep: int = 5) -> None:
        if keep < 2:
            raise StoreError(f"keep_versions is {keep}", hint="keep at least 2 to roll back")
        self.root = root
        self.keep = keep
        self.snapshots = root / "snapshots"
        self.current_link = root / CURRENT_LINK
        self.high_water_path = root / "high-water"
        # An operator's rollback: the version held below the high-water mark on purpose.
        self.pinned_path = root / "pinned"
        self.trial_path = root / "trial"
        self.rejected_path = root / "rejected"
        self.quarantine_dir = root / "quarantine"
        try:
            self.snapshots.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.snapshots}: {exc.strerror}",
                             hint="check paths.state_dir and its permissions") from exc
        self._recover()

    def _recover(self) -> None:
        # Temporaries are what a crash leaves behind; they were never visible as snapshots.
        for entry in self.snapshots.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                entry.unlink(missing_ok=True)
        current = self.current_version()
        if current is not None and current > self.high_water():
            self._write_high_water(current)

    # -- reading --------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Stored versions, oldest first."""
        return sorted(int(p.name) for p in self.snapshots.iterdir() if p.name.isdigit())

    def current_version(self) -> int | None:
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        name = Path(target).name
        return int(name) if name.isdigit() else None

    def path_of(self, version: int) -> Path:
        return self.snapshots / str(version)

    def listing(self) -> list[StoredSnapshot]:
        current = self.current_version()
        return [StoredSnapshot(v, self.path_of(v), v == current) for v in self.versions()]

    def high_water(self) -> int:
        try:
            return int(self.high_water_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise StoreError(f"{self.high_water_path} is corrupt",
                             hint="restore it, or write the highest version you trust") from exc

    def pinned(self) -> int | None:
        """The version an operator rolled back to, while it is still the active one."""
        try:
            version = int(self.pinned_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return version if version == self.current_version() else None

    def pin(self, version: int) -> None:
        """Records that an operator chose `version` (below the high-water mark): sync keeps it
        until a newer version than any seen is published, without calling that a refusal."""
        self._write_text(self.pinned_path, f"{version}\n")

    def manifest(self, version: int) -> Manifest:
        """A stored version's manifest, read alone: the payload beside it may be hundreds of
        megabytes. Stored manifests were verified before they were stored."""
        return Manifest.from_signed(
            json.loads((self.path_of(version) / MANIFEST_NAME).read_bytes())["signed"])

    def read(self, version: int) -> tuple[bytes, bytes]:
        """(manifest bytes, payload bytes) of a stored version."""
        folder = self.path_of(version)
        try:
            return (folder / MANIFEST_NAME).read_bytes(), (folder / PAYLOAD_NAME).read_bytes()
        except OSError as exc:
            raise StoreError(f"version {version} is not stored: {exc.strerror}",
                             hint="list stored versions with `adpop snapshot list`") from exc

    def trial(self) -> Trial | None:
        """The version on trial, when it is the active one (a trial file naming another
        version was left by a crash before `current` switched: nothing is on trial)."""
        try:
            data = json.loads(self.trial_path.read_text())
            trial = Trial(int(data["version"]), data["previous"], int(data["tries"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return trial if trial.version == self.current_version() else None

    def rejected(self) -> set[int]:
        """Versions that failed their health window: never activated again by sync."""
        try:
            return {int(v) for v in self.rejected_path.read_text().split()}
        except (FileNotFoundError, ValueError):
            return set()

    def quarantined(self) -> set[int]:
        """Versions moved aside because their files failed their hash."""
        if not self.quarantine_dir.is_dir():
            return set()
        return {int(p.name.split("-")[0]) for p in self.quarantine_dir.iterdir()
                if p.name.split("-")[0].isdigit()}

    def check(self, version: int) -> str:
        """Whether a stored version's files are still what was verified when it came: the
        manifest parses and the payload has its length and SHA-256. "" when they do, else
        what is wrong. Reads the whole payload: call it off the event loop."""
        folder = self.path_of(version)
        try:
            manifest = self.manifest(version)
        except (OSError, ValueError, KeyError, TypeError, AdpopError) as exc:
            return f"v{version}: {folder / MANIFEST_NAME} is unreadable ({exc})"
        if manifest.version != version:
            return f"v{version}: its manifest says version {manifest.version}"
        path = folder / PAYLOAD_NAME
        try:
            with path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    verify_payload_bytes(manifest, b"")
                else:
                    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                        verify_payload_bytes(manifest, data)
        except OSError as exc:
            return f"v{version}: cannot read {path}: {exc.strerror}"
        except VerifyError as exc:
            if exc.reason is Reason.HASH_MISMATCH:
                return f"v{version}: {path} fails its SHA-256 (the file changed on disk)"
            return f"v{version}: {path}: {exc.message}"
        return ""

    # -- writing --------------------------------------------------------------------------

    def add(self, version: int, manifest: bytes, payload: bytes | Path) -> Path:
        """Store a verified snapshot under its version; refuse versions not above high water.

        `payload` may be a file on the same filesystem (a finished download): it is moved in
        rather than written again. Storing does not activate: call `activate` for that.
        """
        # A quarantined version was accepted once: taking it again repairs the store.
        retake = version in self.quarantined() and version not in self.versions()
        if version <= self.high_water() and not retake:
            raise StaleVersionError(
                f"version {version} is not above the high-water mark {self.high_water()}",
                hint="publish a higher version; older ones can only be re-activated by rollback")
        final = self.path_of(version)
        tmp = self.snapshots / f"{_TMP_PREFIX}{version}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            if isinstance(payload, Path):
                with payload.open("rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(payload, tmp / PAYLOAD_NAME)
            else:
                _write_file(tmp / PAYLOAD_NAME, payload)
            _write_file(tmp / MANIFEST_NAME, manifest)
            fsync_dir(tmp)
            if final.exists():
                # Left by a crash between this rename and the high-water update: the same
                # version, complete. Replace it with what we were given now.
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.snapshots)
            if version > self.high_water():
                self._write_high_water(version)
                self.pinned_path.unlink(missing_ok=True)  # a new version ends the pin
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot store version {version}: {exc.strerror}",
                             hint=f"check free space and permissions under {self.root}") from exc
        return final

    def activate(self, version: int) -> None:
        """Point `current` at a stored version, atomically."""
        if version not in self.versions():
            raise StoreError(f"version {version} is not stored",
                             hint="list stored versions with `adpop snapshot list`")
        tmp = self.root / f"{_TMP_PREFIX}current-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(f"snapshots/{version}", tmp)
        os.replace(tmp, self.current_link)
        fsync_dir(self.root)
        if version > self.high_water():
            # Stored before a crash cut its add() short of the mark: accepted all the same.
            self._write_high_water(version)

    def deactivate(self) -> None:
        """No active snapshot (the first one failed and there is none to go back to)."""
        self.current_link.unlink(missing_ok=True)
        fsync_dir(self.root)

    def install(self, version: int, manifest: bytes, payload: bytes | Path, *,
                trial: bool = False) -> Path:
        """add + activate + prune: the whole of taking a new verified snapshot into service.
        With `trial`, the version is on trial (see `begin_trial`) from before it is active."""
        path = self.add(version, manifest, payload)
        if trial:
            self.begin_trial(version)
        self.activate(version)
        self.prune()
        return path

    def begin_trial(self, version: int) -> None:
        """Marks `version` as on trial, with the active version to go back to; written
        before `current` switches, so no crash leaves an unproven version looking proven."""
        self._write_json(self.trial_path, {"version": version,
                                           "previous": self.current_version(), "tries": 0})

    def retry_trial(self, step: int = 1) -> Trial | None:
        """Counts one more health window (or, with -1, one less) for the version on trial
        and returns it."""
        trial = self.trial()
        if trial is None:
            return None
        trial = Trial(trial.version, trial.previous, max(0, trial.tries + step))
        self._write_json(self.trial_path, {"version": trial.version,
                                           "previous": trial.previous, "tries": trial.tries})
        return trial

    def reject(self, version: int) -> None:
        """`version` failed its window: sync never activates it again."""
        rejected = sorted(self.rejected() | {version})[-100:]
        self._write_text(self.rejected_path, " ".join(map(str, rejected)) + "\n")

    def end_trial(self) -> None:
        """No version is on trial any more (proven, reverted or quarantined)."""
        self.trial_path.unlink(missing_ok=True)
        fsync_dir(self.root)

    def quarantine(self, version: int) -> Path:
        """Moves a stored version aside (never the active one: activate another first)."""
        if version == self.current_version():
            raise StoreError(f"v{version} is active", hint="activate another version first")
        self.quarantine_dir.mkdir(exist_ok=True)
        target = self.quarantine_dir / f"{version}-{time.time_ns()}"
        os.rename(self.path_of(version), target)
        fsync_dir(self.snapshots)
        aside = sorted(self.quarantine_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in aside[:-QUARANTINE_KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def prune(self) -> list[int]:
        """Remove the oldest versions beyond `keep`, never the active one; return removed."""
        current = self.current_version()
        trial = self.trial()
        kept = {current, trial.previous if trial else None}  # the active one and its fallback
        versions = self.versions()
        removed: list[int] = []
        for version in versions[: max(0, len(versions) - self.keep)]:
            if version in kept:
                continue
            shutil.rmtree(self.path_of(version))
            removed.append(version)
        return removed

    def _write_high_water(self, version: int) -> None:
        self._write_text(self.high_water_path, f"{version}\n")

    def _write_json(self, path: Path, data: dict[str, object]) -> None:
        self._write_text(path, json.dumps(data) + "\n")

    def _write_text(self, path: Path, text: str) -> None:
        """Replaces `path` whole and durably: a crash leaves the old file or the new one."""
        tmp = self.root / f"{_TMP_PREFIX}{path.name}-{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)
