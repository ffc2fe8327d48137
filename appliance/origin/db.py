"""The origin's state in SQLite: authoring documents, paused campaigns, published versions,
the fleet of registered PoPs and where each rollout stands.

Campaigns are kept as the documents they were authored in (one row per file), so a publish
validates and compiles exactly what an operator imported; pausing is an overlay by campaign
id. Published payloads are files named by their SHA-256 under `payloads/` (immutable), and
their manifests live in the `versions` table.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.durable import write_file
from appliance.errors import AdpopError
from appliance.snapshot.model import CampaignSet, parse_documents, read_documents

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (name TEXT PRIMARY KEY, body TEXT NOT NULL,
                                      imported INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS paused (campaign TEXT PRIMARY KEY, since INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, length INTEGER NOT NULL,
    campaigns INTEGER NOT NULL, created INTEGER NOT NULL, manifest BLOB NOT NULL,
    stage TEXT NOT NULL, stage_started REAL NOT NULL, halted TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS pops (
    id TEXT PRIMARY KEY, push_url TEXT NOT NULL, target_group TEXT NOT NULL,
    registered REAL NOT NULL, last_seen REAL NOT NULL, version INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT '', activated REAL NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT '', failed_version INTEGER NOT NULL DEFAULT 0,
    refused TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS enrollments (
    token_sha256 TEXT PRIMARY KEY, pop TEXT NOT NULL, target_group TEXT NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL, used REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY, pop TEXT NOT NULL, target_group TEXT NOT NULL,
    issued REAL NOT NULL, not_after REAL NOT NULL, revoked REAL NOT NULL DEFAULT 0,
    push_address TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, revoked REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, operator TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, outcome TEXT NOT NULL);
"""
# Columns added after a table first shipped: (table, column, its definition).
_ADDED = (("certificates", "push_address", "TEXT NOT NULL DEFAULT ''"),)

# Rollout stages of a version, in order; "halted" and "done" end it.
STAGES = ("canary", "percent", "all", "done")


def folder_documents(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """The campaign documents in `folder`, named by their path inside it: importing the
    folder again replaces its files. As JSON holds them (TOML's dates as ISO strings), so
    they travel to the API and are stored alike."""
    return [(_relative(name, folder), json.loads(json.dumps(doc, default=_iso)))
            for name, doc in read_documents(folder)]


def _relative(name: str, folder: Path) -> str:
    try:
        return str(Path(name).resolve().relative_to(folder.resolve()))
    except ValueError:
        return name


def _iso(value: Any) -> str:
    # TOML dates and times are stored as ISO 8601 text, which the model parses back the same.
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    raise TypeError(f"cannot store a {type(value).__name__} in a campaign document")


class OriginError(AdpopError):
    """The origin's store refused an operation."""


@dataclass(frozen=True)
class CampaignRow:
    id: str
    advertiser: str
    name: str
    document: str
    paused: bool


@dataclass(frozen=True)
class VersionRow:
    version: int
    sha256: str
    length: int
    campaigns: int
    created: int
    stage: str
    stage_started: float
    halted: str


@dataclass(frozen=True)
class PopRow:
    id: str
    push_url: str
    target_group: str
    registered: float
    last_seen: float
    version: int
    sha256: str
    activated: float
    failures: int
    last_error: str
    state: str
    failed_version: int
    refused: str  # JSON: the PoP's refusal counters by reason, as it last reported them


class OriginDB:
    """One SQLite file; every write is one transaction."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.payload_dir = state_dir / "payloads"
        try:
            self.payload_dir.mkdir(parents=True, exist_ok=True)
            database = state_dir / "origin.sqlite"
            # The database holds what the fleet trusts the origin with (PoP registrations,
            # rollout state): readable by its owner only. SQLite gives the -wal and -shm
            # files the database file's mode.
            # Created only when missing: closing any descriptor of the file would drop the
            # POSIX locks another connection of this process holds on it (the API runs
            # operators' actions on connections of their own).
            if not database.exists():
                os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
            os.chmod(database, 0o600)
            self._db = sqlite3.connect(database, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            for table, column, definition in _ADDED:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except (OSError, sqlite3.Error) as exc:
            raise OriginError(f"cannot open the origin database under {state_dir}: {exc}",
                              hint="set origin.state_dir (or --state) to a writable folder"
                              ) from exc

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- campaigns ---------------------------------------------------------------------

    def import_dir(self, folder: Path) -> CampaignSet:
        """Validate the folder's documents together with the stored ones, then store them.

        A document with the name of a stored one replaces it. Nothing is stored unless the
        whole resulting set validates.
        """
        return self.import_documents(folder_documents(folder))

    def import_documents(self, incoming: Sequence[tuple[str, dict[str, Any]]]
                         ) -> CampaignSet:
        """import_dir for documents already read (an operator's import over the API)."""
        stored = {name: doc for name, doc in self._documents()}
        stored.update(dict(incoming))
        campaign_set = parse_documents(sorted(stored.items()))  # raises CampaignError
        now = int(time.time())
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?, ?)",
                           [(name, json.dumps(doc, sort_keys=True, default=_iso), now)
                            for name, doc in incoming])
        return campaign_set

    def _documents(self) -> list[tuple[str, dict[str, Any]]]:
        rows = self._db.execute("SELECT name, body FROM documents ORDER BY name").fetchall()
        return [(name, json.loads(body)) for name, body in rows]

    def campaign_set(self) -> CampaignSet:
        """The stored campaigns with the pause overlay applied."""
        campaign_set = parse_documents(self._documents())
        paused = self.paused_ids()
        if not paused:
            return campaign_set
        return replace(campaign_set, campaigns=tuple(
            replace(c, paused=True) if c.id in paused else c for c in campaign_set.campaigns))

    def campaigns(self) -> list[CampaignRow]:
        paused = self.paused_ids()
        rows = []
        for name, doc in self._documents():
            for raw in doc.get("campaigns", []):
                if isinstance(raw, Mapping):
                    cid = str(raw.get("id", ""))
                    rows.append(CampaignRow(cid, str(raw.get("advertiser", "")),
                                            str(raw.get("name", cid)), name,
                                            cid in paused or bool(raw.get("paused", False))))
        return sorted(rows, key=lambda r: r.id)

    def paused_ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT campaign FROM paused")}

    def set_paused(self, campaign_id: str, paused: bool) -> None:
        known = {row.id for row in self.campaigns()}
        if campaign_id not in known:
            raise OriginError(f"no campaign {campaign_id!r} in the origin's store",
                              hint="`adpop origin campaigns list` shows the ids")
        with self._tx() as db:
            if paused:
                db.execute("INSERT OR IGNORE INTO paused VALUES (?, ?)",
                           (campaign_id, int(time.time())))
            else:
                db.execute("DELETE FROM paused WHERE campaign = ?", (campaign_id,))

    # --- versions ----------------------------------------------------------------------

    def next_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM versions").fetchone()
        return int(row[0] or 0) + 1

    def latest_sha256(self) -> str:
        row = self._db.execute(
            "SELECT sha256 FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        return str(row[0]) if row else ""

    def add_version(self, version: int, manifest: bytes, payload: bytes, sha256: str,
                    campaigns: int, created: int, first_stage: str,
                    vouch: Callable[[], None] | None = None) -> Path:
        """Store a published version; its payload file first, so a manifest never lacks it.
        `vouch` runs under the publish lock before the version's row appears (listing it in
        the TUF targets): the rollout loop, which pushes as soon as it sees the row, never
        sends a PoP to a version it cannot verify yet."""
        path = self.payload_dir / f"{sha256}.capnp"
        with self._publishing(blocking=True):
            if not path.exists():
                # Durable before the row that names it: a manifest never lacks its payload.
                write_file(path, payload)
            if vouch is not None:
                vouch()
            self._insert_version(version, manifest, payload, sha256, campaigns, created,
                                 first_stage)
        return path

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The publish lock, for other writers of what a publish writes (the TUF
        repository's re-signing and key rotation)."""
        with self._publishing(blocking=True):
            yield

    @contextmanager
    def _publishing(self, blocking: bool) -> Iterator[bool]:
        """An exclusive lock while a payload is written and its version stored (yields
        whether it was taken; without `blocking` a running publish makes it False): the
        cleanup of leftovers then knows no publish is midway."""
        fd = os.open(self.state_dir / "publish.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                taken = True
            except BlockingIOError:
                taken = False
            yield taken
        finally:
            os.close(fd)  # releases the lock

    def _insert_version(self, version: int, manifest: bytes, payload: bytes, sha256: str,
                        campaigns: int, created: int, first_stage: str) -> None:
        with self._tx() as db:
            # Checked inside the transaction: two publishers cannot both take a version.
            row = db.execute("SELECT MAX(version) FROM versions").fetchone()
            if version <= int(row[0] or 0):
                raise OriginError(f"version {version} is not above the last published one",
                                  hint="publish again: the next version is taken afresh")
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, '')",
                       (version, sha256, len(payload), campaigns, created, manifest,
                        first_stage, time.time()))

    def clean_leftovers(self, older_than: float = 3600.0) -> list[Path]:
        """Removes what a publish killed midway leaves: `.tmp` payloads, and payload files no
        version references. While a publish runs (it holds the publish lock between writing
        its payload and storing its version) only files older than `older_than` seconds
        go. Returns what was removed."""
        with self._publishing(blocking=False) as idle:
            referenced = {f"{sha}.capnp" for (sha,) in
                          self._db.execute("SELECT DISTINCT sha256 FROM versions").fetchall()}
            cutoff = time.time() if idle else time.time() - older_than
            removed = []
            for path in self.payload_dir.iterdir():
                if path.name in referenced or path.suffix not in (".tmp", ".capnp"):
                    continue
                try:
                    if path.stat().st_mtime <= cutoff:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    continue  # another cleaner was first
        return removed

    def versions(self) -> list[VersionRow]:
        rows = self._db.execute(
            "SELECT version, sha256, length, campaigns, created, stage, stage_started, halted "
            "FROM versions ORDER BY version").fetchall()
        return [VersionRow(*row) for row in rows]

    def manifest(self, version: int) -> bytes | None:
        row = self._db.execute("SELECT manifest FROM versions WHERE version = ?",
                               (version,)).fetchone()
        return bytes(row[0]) if row else None

    def set_stage(self, version: int, stage: str, halted: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE versions SET stage = ?, stage_started = ?, halted = ? "
                       "WHERE version = ?", (stage, time.time(), halted, version))

    def payload_path(self, sha256: str) -> Path | None:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            return None
        path = self.payload_dir / f"{sha256}.capnp"
        return path if path.is_file() else None

    # --- fleet -------------------------------------------------------------------------

    def register(self, pop_id: str, push_url: str, target_group: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO pops (id, push_url, target_group, registered, last_seen) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                       "push_url = excluded.push_url, target_group = excluded.target_group, "
                       "last_seen = excluded.last_seen", (pop_id, push_url, target_group, now, now))

    def report(self, pop_id: str, fields: Mapping[str, Any]) -> None:
        """A PoP's status report: what it serves, and its last failure if any."""
        with self._tx() as db:
            found = db.execute("SELECT failures, last_error FROM pops WHERE id = ?",
                               (pop_id,)).fetchone()
            if found is None:
                raise OriginError(f"PoP {pop_id!r} is not registered",
                                  hint="the PoP registers itself when its sync starts")
            error = str(fields.get("error", ""))
            # A failure counts once: a PoP repeats the same refusal at every poll.
            failures = int(found[0]) + (1 if error and error != found[1] else 0)
            refused = fields.get("refused", {})
            db.execute("UPDATE pops SET last_seen = ?, version = ?, sha256 = ?, activated = ?, "
                       "failures = ?, last_error = ?, state = ?, "
                       "failed_version = MAX(failed_version, ?), refused = ? WHERE id = ?",
                       (time.time(), int(fields.get("version", 0)), str(fields.get("sha256", "")),
                        float(fields.get("activated", 0)), failures, error,
                        str(fields.get("state", "")), int(fields.get("failed_version", 0)),
                        json.dumps(refused if isinstance(refused, dict) else {},
                                   sort_keys=True), pop_id))

    # --- identities: enrollment tokens and the certificates they were traded for ---------

    def add_enrollment(self, token_sha256: str, pop: str, group: str, expires: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO enrollments (token_sha256, pop, target_group, created, "
                       "expires) VALUES (?, ?, ?, ?, ?)",
                       (token_sha256, pop, group, time.time(), expires))

    def take_enrollment(self, token_sha256: str, now: float,
                        issue: Callable[[str, str], tuple[int, float, str]]) -> tuple[str, str]:
        """The (PoP, group) a token enrolls. In one transaction the token is marked used and
        the certificate `issue(pop, group)` makes ((serial, not after, push address)) is
        recorded: a token works once, and a crash spends it only with its certificate.
        Raises OriginError saying why it does not work."""
        with self._tx() as db:
            row = db.execute("SELECT pop, target_group, expires, used FROM enrollments "
                             "WHERE token_sha256 = ?", (token_sha256,)).fetchone()
            if row is None:
                raise OriginError("unknown enrollment token",
                                  hint="make one with `adpop origin pops enroll NAME`")
            pop, group, expires, used = row
            if used:
                raise OriginError(f"the enrollment token of {pop} was used already",
                                  hint="make a new one with `adpop origin pops enroll NAME`")
            if now >= expires:
                raise OriginError(f"the enrollment token of {pop} expired",
                                  hint="make a new one with `adpop origin pops enroll NAME`")
            serial, not_after, push_address = issue(str(pop), str(group))
            db.execute("INSERT INTO certificates (serial, pop, target_group, issued, not_after, "
                       "push_address) VALUES (?, ?, ?, ?, ?, ?)",
                       (str(serial), pop, group, time.time(), not_after, push_address))
            db.execute("UPDATE enrollments SET used = ? WHERE token_sha256 = ?",
                       (now, token_sha256))
        return str(pop), str(group)

    def push_address(self, serial: int) -> str:
        """The HOST:PORT a certificate was enrolled with for push notices ("": none)."""
        row = self._db.execute("SELECT push_address FROM certificates WHERE serial = ? AND "
                               "revoked = 0", (str(serial),)).fetchone()
        return str(row[0]) if row else ""

    def certificate_valid(self, serial: int) -> bool:
        """Issued by this origin and not revoked."""
        row = self._db.execute("SELECT revoked FROM certificates WHERE serial = ?",
                               (str(serial),)).fetchone()
        return row is not None and not row[0]

    def revoke(self, pop: str) -> tuple[int, int]:
        """Revokes every certificate of `pop` and drops its unused enrollment tokens; returns
        how many of each."""
        with self._tx() as db:
            certs = db.execute("UPDATE certificates SET revoked = ? WHERE pop = ? AND "
                               "revoked = 0", (time.time(), pop)).rowcount
            tokens = db.execute("DELETE FROM enrollments WHERE pop = ? AND used = 0",
                                (pop,)).rowcount
            # No more push notices to it either: its address came with its certificate.
            db.execute("UPDATE pops SET push_url = '' WHERE id = ?", (pop,))
        return certs, tokens

    def identities(self) -> list[tuple[str, str, int, int]]:
        """(PoP, group, valid certificates, unused tokens) for every PoP ever enrolled."""
        rows = self._db.execute(
            "SELECT pop, target_group, SUM(revoked = 0), 0 FROM certificates GROUP BY pop "
            "UNION ALL SELECT pop, target_group, 0, COUNT(*) FROM enrollments WHERE used = 0 "
            "GROUP BY pop").fetchall()
        merged: dict[str, tuple[str, str, int, int]] = {}
        for pop, group, certs, tokens in rows:
            _, _, c, t = merged.get(pop, (pop, group, 0, 0))
            merged[pop] = (pop, group, c + int(certs), t + int(tokens))
        return [merged[k] for k in sorted(merged)]

    # --- operators: their tokens (hashed) and what they did ------------------------------

    def add_operator(self, name: str, role: str, token_sha256: str) -> None:
        with self._tx() as db:
            found = db.execute("SELECT revoked FROM operators WHERE name = ?",
                               (name,)).fetchone()
            if found is not None and not found[0]:
                raise OriginError(f"operator {name!r} has a token already",
                                  hint=f"revoke it first: `adpop origin tokens revoke {name}`")
            db.execute("INSERT OR REPLACE INTO operators (name, role, token_sha256, created) "
                       "VALUES (?, ?, ?, ?)", (name, role, token_sha256, time.time()))

    def operator(self, token_sha256: str) -> tuple[str, str] | None:
        """(name, role) of the live token with this digest."""
        row = self._db.execute("SELECT name, role FROM operators WHERE token_sha256 = ? AND "
                               "revoked = 0", (token_sha256,)).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def revoke_operator(self, name: str) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE operators SET revoked = ? WHERE name = ? AND "
                              "revoked = 0", (time.time(), name)).rowcount > 0

    def operators(self) -> list[tuple[str, str, float, float]]:
        """(name, role, created, revoked) of every operator token."""
        return [(str(n), str(r), float(c), float(v)) for n, r, c, v in self._db.execute(
            "SELECT name, role, created, revoked FROM operators ORDER BY name")]

    def log_action(self, operator: str, action: str, target: str, outcome: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO audit (at, operator, action, target, outcome) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (time.time(), operator, action, target[:200], outcome[:500]))

    def audit(self, limit: int = 100) -> list[tuple[float, str, str, str, str]]:
        """The newest `limit` actions, oldest first: (at, operator, action, target, outcome)."""
        rows = self._db.execute("SELECT at, operator, action, target, outcome FROM audit "
                                "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [(float(a), str(o), str(c), str(t), str(r)) for a, o, c, t, r in reversed(rows)]

    def pops(self, ids: Sequence[str] | None = None) -> list[PopRow]:
        rows = self._db.execute(
            "SELECT id, push_url, target_group, registered, last_seen, version, sha256, "
            "activated, failures, last_error, state, failed_version, refused FROM pops "
            "ORDER BY id"
        ).fetchall()
        out = [PopRow(*row) for row in rows]
        return [p for p in out if p.id in ids] if ids is not None else out
