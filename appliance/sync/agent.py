"""The PoP side of sync: take a snapshot from the origin like a secure updater, activate it,
watch it through a health window, report.

Every check refuses with a VerifyError naming its Reason; `current` stays as it was, the
refusal is counted, logged once and reported to the origin. The checks, cheapest first:
manifest size cap -> the origin's TUF metadata, verified from the trusted root, lists these
exact manifest bytes (sync/trust.py: signatures, thresholds, expiry, versions) -> schema and
target group -> expiry with clock-skew slack -> payload size cap -> version above the
high-water mark -> payload length and hash (before any parsing) -> Cap'n Proto traversal and
nesting limits -> semantic bounds -> a hold on a big jump in campaigns or size.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import mmap
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from appliance import httpguard, secrets
from appliance.config import (
    ApplianceConfig,
    PopSettings,
    SnapshotSettings,
    SyncSettings,
    under,
)
from appliance.errors import AdpopError
from appliance.events.batch import POP_HEADER
from appliance.snapshot import bundle
from appliance.snapshot.compiler import PayloadError, open_payload
from appliance.snapshot.manifest import (
    PAYLOAD_NAME,
    Manifest,
    Policy,
    Reason,
    VerifyError,
    verify_manifest,
    verify_payload_bytes,
)
from appliance.snapshot.store import SnapshotStore
from appliance.sync import allowances
from appliance.sync.allowances import AllowanceError, Believed
from appliance.sync.engine import EngineAdmin, EngineHealth
from appliance.sync.fetch import fetch_manifest, fetch_payload
from appliance.sync.trust import Trust

if TYPE_CHECKING:  # annotations only: the schema is for type checkers and tests
    from appliance.origin.ca import Identity
    from appliance.supervisor.schema import SyncReport

log = logging.getLogger("adpop.sync")

# Semantic bounds a payload must keep whatever its signature says (a generated file can be
# signed and still wrong).
MAX_CAMPAIGNS = 10_000_000
# Registration and status reports are small: an origin that does not answer them within this
# long is treated as unreachable (the session has no overall deadline, fetches set their own).
CALL_TIMEOUT = 10.0
IDENTITY_RETRY = 5.0  # between enrollment attempts while the origin cannot be reached
PUSH_CONNECTIONS = 64  # only the origin pushes; room for its retries, not for a flood
TUF_DIR = "tuf"  # under paths.state_dir: the TUF metadata this PoP verified
ALLOWANCE_FILE = "allowance.json"  # under paths.state_dir: the last allowance believed
PACING_CHECK = 1.0  # s: the engine's allowance is compared with the last believed this often
FIRST_PACING_POLL = 2.0  # s: until an allowance says the origin's interval


@dataclass
class SyncState:
    """What the PoP reports, and the refusal counters by reason."""

    version: int = 0
    sha256: str = ""
    activated: float = 0.0
    state: str = "starting"
    error: str = ""
    origin_problem: str = ""  # why the origin cannot be registered with ("" once it can)
    failed_version: int = 0
    pinned: int = 0  # the version an operator rolled back to, kept until the next publish
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    last_logged: str = ""

    def report(self) -> SyncReport:
        return {"version": self.version, "sha256": self.sha256, "activated": self.activated,
                "state": self.state, "error": self.error, "origin_problem": self.origin_problem,
                "failed_version": self.failed_version, "pinned": self.pinned,
                "refused": dict(self.refused)}


class SyncAgent:
    """Keeps the store on the newest snapshot the origin offers and this PoP's policy accepts.

    Takes only what it reads: its own [sync] section, the [snapshot] limits and trust, the
    PoP's [pop] identity, the state folder trust paths are under, and the engine's admin
    socket ("" when there is no engine to tell)."""

    def __init__(self, sync: SyncSettings, snapshot: SnapshotSettings, pop: PopSettings,
                 store: SnapshotStore, *, state_dir: str, engine_socket: str = "",
                 health: Callable[[], Awaitable[str]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.sync, self.snap, self.pop = sync, snapshot, pop
        self.state_dir = state_dir
        self.store = store
        self.policy: Policy | None = None
        self.clock = clock
        self.health = health
        # With an engine, activation tells it to load and the window watches it.
        self.engine = EngineHealth(EngineAdmin(engine_socket)) if engine_socket else None
        self.state = SyncState()
        # The push listener's TLS, and the client's, once this PoP has its certificate
        # (https:// origins).
        self.listener_tls: ssl.SSLContext | None = None
        self.client_tls: ssl.SSLContext | None = None
        # What a manifest is believed for: the origin's TUF targets (sync/trust.py).
        self.trust = Trust(under(state_dir, TUF_DIR), under(state_dir, snapshot.trust_root),
                           str(sync.origin_url))
        self.load_policy()
        self.wake = asyncio.Event()
        self.pushed: bytes | None = None  # a manifest a push notice carried, not yet taken
        # Fleet budgets (sync/allowances.py): the last allowance believed, and one pushed.
        self.allowance: Believed | None = None
        self.allowance_pushed: bytes | None = None
        self.allowance_wake = asyncio.Event()
        self.allowance_problem = ""
        self.session: ClientSession | None = None
        # Held by whatever switches `current` (install, revert, repair), never across a
        # health window: the supervisor's repair and the sync loop take turns.
        self.changing = asyncio.Lock()
        self.adopt_current()

    @classmethod
    def from_config(cls, appliance: ApplianceConfig, store: SnapshotStore, *,
                    health: Callable[[], Awaitable[str]] | None = None,
                    clock: Callable[[], float] = time.time) -> SyncAgent:
        """The agent an appliance configuration describes (its admin socket as configured:
        "" runs without an engine)."""
        a = appliance
        return cls(a.sync, a.snapshot, a.pop, store, state_dir=a.paths.state_dir,
                   engine_socket=a.engine.admin_socket, health=health, clock=clock)

    def load_policy(self) -> Policy | None:
        """The checks besides trust; None (and the reason in state.error) while the PoP has
        no TUF root to trust: a freshly flashed PoP without it still runs and says what it
        needs."""
        problem = self.trust.problem()
        if problem:
            self.state.error = problem
            self.policy = None
            return None
        self.policy = bundle.policy_for(self.snap, self.pop.target_group)
        return self.policy

    def adopt_current(self) -> None:
        """Reports what the store has active (at start, and after an operator's rollback): a
        version still on trial is "checking" until its window completes, never "active"."""
        current = self.store.current_version()
        if current is not None:
            self.state.version = current
            self.state.state = "checking" if self.store.trial() else "active"
            try:
                self.state.sha256 = self.store.manifest(current).payload_sha256
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # A damaged manifest: the supervisor's check before the engine starts
                # quarantines the version; until then say so.
                self.state.sha256, self.state.error = "", f"v{current}: manifest unreadable ({exc})"
        pinned = self.store.pinned()
        self.state.pinned = pinned or 0
        if pinned is not None:
            # The operator's choice, not a failure: nothing to report as an error.
            self.state.state, self.state.error = "pinned", ""

    @property
    def origin(self) -> str:
        return str(self.sync.origin_url).rstrip("/")

    # --- one sync ----------------------------------------------------------------------

    async def sync_once(self) -> Manifest | None:
        """Fetch, check and activate the origin's snapshot for this PoP; the manifest of the
        version activated, or None when there was nothing new. Raises VerifyError on a
        refusal."""
        assert self.session is not None
        deadline = time.monotonic() + self.sync.fetch_timeout
        manifest_bytes, self.pushed = self.pushed, None
        limit = self.snap.max_manifest_bytes
        if manifest_bytes is not None and len(manifest_bytes) > limit:
            raise VerifyError(Reason.TOO_LARGE, f"pushed manifest passed {limit} bytes")
        if manifest_bytes is None:
            url = f"{self.origin}/v1/manifest?pop={self.pop.id}"
            manifest_bytes = await fetch_manifest(self.session, url,
                                                  limit, deadline)
        if manifest_bytes is None:
            return None
        assert self.policy is not None  # attempt() loads it first
        # Believed only once the origin's TUF targets list these very bytes.
        await asyncio.to_thread(self.trust.vouch, manifest_bytes, self.client_tls)
        manifest = verify_manifest(manifest_bytes, self.policy, now=self.clock(), vouched=True)
        current = self.store.current_version()
        if current is not None and manifest.version == current:
            return None
        if manifest.version <= self.store.high_water() and self.store.pinned() is not None:
            return None  # pinned by an operator's rollback until a newer version comes
        # A version already stored (a crash cut its activation short) is taken from the
        # store, whatever the high-water mark says; see _retake.
        stored = manifest.version in self.store.versions()
        if (manifest.version <= self.store.high_water() or stored) and \
                not await self._retake(manifest):
            raise VerifyError(Reason.ROLLBACK, f"version {manifest.version} is not above the "
                              f"high-water mark {self.store.high_water()}")
        if manifest.version in self.store.versions():
            return manifest  # activated from the store, on trial
        partial = self.store.root / f".partial-{manifest.payload_sha256}"
        try:
            await fetch_payload(
                self.session, f"{self.origin}/v1/payload/{manifest.payload_sha256}",
                manifest.payload_length, partial, deadline)
            # Hashing, walking and fsyncing up to snapshot.max_payload_bytes take seconds:
            # in a thread, so this loop (which sends WATCHDOG=1) keeps its rounds.
            async with self.changing:
                await asyncio.to_thread(self._check_and_install, manifest, manifest_bytes,
                                        partial, current)
        except VerifyError as exc:
            # A slow or unreachable origin keeps the bytes for resume; wrong bytes go.
            if exc.reason not in (Reason.SLOW_RETRIEVAL, Reason.UNREACHABLE):
                partial.unlink(missing_ok=True)
            raise
        return manifest

    def _check_and_install(self, manifest: Manifest, manifest_bytes: bytes, partial: Path,
                           current: int | None) -> None:
        # Checked through a read-only map of the download: no copy of it in memory.
        with partial.open("rb") as fh, \
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as payload:
            verify_payload_bytes(manifest, payload)
            self._check_payload(manifest, payload, current)
        # The checked download itself moves into the store: no second write of the payload.
        self.store.install(manifest.version, manifest_bytes, partial, trial=True)

    async def _retake(self, manifest: Manifest) -> bool:
        """Whether a version at or below the high-water mark may still be taken: one whose
        store a crash interrupted before `current` switched (activated here, on trial), or
        one quarantined for a damaged file (downloaded again). Never one that failed its
        window, and never one below the active version: that would be a rollback."""
        version = manifest.version
        current = self.store.current_version() or 0
        if version <= current or version in self.store.rejected():
            return False
        if version in self.store.versions():
            if manifest.payload_sha256 != self.store.manifest(version).payload_sha256:
                return False
            async with self.changing:
                problem = await asyncio.to_thread(self.store.check, version)
                if problem:
                    log.error("%s; quarantined, fetching it again", problem)
                    self.store.quarantine(version)
                    return True
                log.warning("v%d was stored before a restart and never activated: "
                            "activating it on trial", version)
                self.store.begin_trial(version)
                self.store.activate(version)
            return True
        return version in self.store.quarantined()

    def _check_payload(self, manifest: Manifest, payload: bytes | mmap.mmap,
                       current: int | None) -> None:
        if len(payload) < 16 or int.from_bytes(payload[0:4], "little") != 0:
            raise VerifyError(Reason.CORRUPT_PAYLOAD, "the payload is not one Cap'n Proto segment")
        try:
            with open_payload(payload, self.snap.nesting_limit) as p:
                # Structure first: every pointer walked under the traversal and nesting limits.
                # The compiler writes one segment with no gaps, so the words the pointers reach
                # are the whole segment but the root pointer; a broken pointer reads as an
                # empty default and reaches less.
                reached = p.total_size.word_count + 1
                segment = int.from_bytes(payload[4:8], "little")
                if reached != segment:
                    raise VerifyError(Reason.CORRUPT_PAYLOAD, f"the payload's pointers reach "
                                      f"{reached} of its {segment} words")
                if p.version != manifest.version:
                    raise VerifyError(Reason.OUT_OF_BOUNDS, f"payload says version {p.version}, "
                                      f"manifest {manifest.version}")
                campaigns = len(p.campaigns)
                if campaigns != p.stats.campaigns or campaigns > MAX_CAMPAIGNS:
                    raise VerifyError(Reason.OUT_OF_BOUNDS,
                                      f"{campaigns} campaigns (stats say {p.stats.campaigns}, "
                                      f"limit {MAX_CAMPAIGNS})")
                # The engine refuses a payload whose campaigns exceed these stats.
                snap = self.snap
                for what, value, limit in (
                        ("eCPM", p.stats.maxEcpmMicros, snap.max_ecpm_micros),
                        ("daily budget", p.stats.maxBudgetDailyMicros,
                         snap.max_budget_daily_micros)):
                    if value > limit:
                        raise VerifyError(Reason.OUT_OF_BOUNDS,
                                          f"a campaign's {what} is {value / 1e6:g}, above the "
                                          f"limit {limit / 1e6:g} (snapshot.max_*_micros)")
        except PayloadError as exc:
            raise VerifyError(Reason.CORRUPT_PAYLOAD, exc.message) from exc
        limit = self.snap.max_jump_percent
        if current is None or limit == 0 or manifest.allow_jump:
            return
        # The active payload was checked when it came; a map of it gives its counts cheaply.
        with (self.store.path_of(current) / PAYLOAD_NAME).open("rb") as fh, \
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as old, \
                open_payload(old, self.snap.nesting_limit) as p:
            old_campaigns, old_size = len(p.campaigns), len(old)
        for what, before, after in (("campaign count", old_campaigns, campaigns),
                                    ("payload size", old_size, len(payload))):
            if before and abs(after - before) * 100 > limit * before:
                raise VerifyError(Reason.JUMP_HELD, f"{what} moves from {before} to {after}, "
                                  f"more than {limit}%, and the manifest does not allow it")

    # --- activation, health window, reporting ------------------------------------------

    async def attempt(self) -> None:
        """One sync with its health window and report; never raises on a refusal. A version
        left on trial by a crash gets its window first."""
        trial = self.store.trial()
        if trial is not None:
            await self._prove(trial.version)
            await self.report()
            return
        if self.policy is None and self.load_policy() is None:
            return
        try:
            manifest = await self.sync_once()
        except VerifyError as exc:
            self._refused(exc)
            await self.report()
            return
        if manifest is not None:
            self.state.pinned = 0  # a newer version was taken: the operator's pin has ended
            await self._prove(manifest.version)
        await self.report()

    async def _prove(self, version: int) -> None:
        """Runs the health window of the version on trial; keeps it when it passes, else goes
        back to the version before it. A crash inside the window leaves the trial in place:
        the next start runs the window again (a crash of the supervisor says nothing about
        the version, and reverting for it could leave nothing to serve)."""
        trial = self.store.retry_trial()
        if trial is None or trial.version != version:
            return
        self.state.version, self.state.state, self.state.error = version, "checking", ""
        self.state.sha256 = self.store.manifest(version).payload_sha256
        await self.report()  # the origin hears "checking", which no rollout counts
        if trial.tries > 1:
            log.warning("v%d: its health window again, %d cut short by a crash before",
                        version, trial.tries - 1)
        if version in self.store.rejected():
            problem = "it failed before a crash cut its revert short"
        else:
            try:
                problem = await self._health_window(version)
            except asyncio.CancelledError:
                # A clean stop is not a crash: this window does not count against it.
                self.store.retry_trial(-1)
                raise
        if self.store.current_version() != version:
            # An operator's rollback or a repair switched `current` meanwhile: theirs stands.
            log.warning("v%d's health window ended with v%s active instead; keeping that",
                        version, self.store.current_version())
            self.adopt_current()
            return
        if problem:
            await self._revert(version, trial.previous, problem)
            return
        self.store.end_trial()
        self.state.activated = time.time()
        self.state.state = "active"
        log.info("v%d active", version)

    async def _revert(self, version: int, previous: int | None, problem: str) -> None:
        self.state.failed_version = version
        self.state.error = f"v{version} failed its health window: {problem}"
        log.error("%s; %s", self.state.error,
                  f"reverting to v{previous}" if previous is not None else "nothing to go back to")
        async with self.changing:
            # Rejected first: a crash from here on can only finish the revert.
            self.store.reject(version)
            if previous is None or previous not in self.store.versions():
                self.store.deactivate()
            else:
                self.store.activate(previous)
            self.store.end_trial()
        if previous is not None and self.engine is not None and self.engine.admin.running():
            reload_problem = await self.engine.admin.load()
            if reload_problem:
                log.error("engine did not take v%s back: %s", previous, reload_problem)
        self.state.version = self.store.current_version() or 0
        self.state.state = "active" if self.state.version else "empty"
        self.state.sha256 = (self.store.manifest(self.state.version).payload_sha256
                             if self.state.version else "")

    async def _health_window(self, version: int) -> str:
        if self.engine is not None:
            # First the engine must say it serves this version (it may still be starting).
            problem = await self.engine.start(version)
            if problem:
                return problem
        end = time.monotonic() + self.sync.health_window
        while True:
            for check in (self.engine.check if self.engine else None, self.health):
                if check is not None:
                    problem = str(await check())
                    if problem:
                        return problem
            if time.monotonic() >= end:
                return ""
            await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))

    async def repair_current(self) -> str:
        """Checks the active version's files against its manifest. When they fail, activates
        the newest retained version whose files pass, quarantines the damaged ones and
        reports it; "" when the active version is whole, else what was done. Hashing reads
        the whole payload: it runs in a thread."""
        async with self.changing:
            current = self.store.current_version()
            if current is None:
                return ""
            problem = await asyncio.to_thread(self.store.check, current)
            if not problem:
                return ""
            rejected = self.store.rejected()
            fallback = None
            for version in sorted(set(self.store.versions()) - {current} - rejected,
                                  reverse=True):
                other = await asyncio.to_thread(self.store.check, version)
                if not other:
                    fallback = version
                    break
                log.error("%s; quarantined", other)
                self.store.quarantine(version)
            if fallback is None:
                self.store.deactivate()
            else:
                self.store.activate(fallback)
            self.store.end_trial()  # nothing of it is on trial now
            self.store.quarantine(current)
            serving = f"v{fallback}" if fallback is not None else "nothing until sync fetches"
            self.state.version = fallback or 0
            self.state.state = "active" if fallback is not None else "empty"
            self.state.sha256 = (self.store.manifest(fallback).payload_sha256
                                 if fallback is not None else "")
            self.state.failed_version = current
            self.state.error = f"{problem}; quarantined it, now {serving}"
            log.error("%s", self.state.error)
        if self.session is not None:
            await self.report()
        return self.state.error

    def _refused(self, exc: VerifyError) -> None:
        self.state.refused[exc.reason.value] += 1
        self.state.error = exc.line()
        # Logged once per distinct refusal: a poll loop must not repeat it every interval.
        if self.state.last_logged != exc.line():
            log.warning("snapshot refused, keeping v%s: %s", self.store.current_version(),
                        exc.line())
            self.state.last_logged = exc.line()

    async def report(self) -> None:
        assert self.session is not None
        try:
            async with self.session.post(f"{self.origin}/v1/pops/{self.pop.id}/status",
                                         json=self.state.report(),
                                         timeout=ClientTimeout(total=CALL_TIMEOUT)) as resp:
                await resp.read()
        except (ClientError, TimeoutError) as exc:
            log.debug("report to the origin failed: %s", exc)

    async def register(self, push_url: str) -> bool:
        assert self.session is not None
        try:
            async with self.session.post(
                    f"{self.origin}/v1/pops/{self.pop.id}/register",
                    json={"push_url": push_url, "target_group": self.pop.target_group},
                    timeout=ClientTimeout(total=CALL_TIMEOUT)) as resp:
                ok = resp.status < 300
                self.state.origin_problem = "" if ok else (
                    f"origin {self.origin} refused registration: HTTP {resp.status}")
                return ok
        except (ClientError, TimeoutError) as exc:
            self.state.origin_problem = (f"origin {self.origin} not reachable: "
                                         f"{exc or type(exc).__name__}")
            return False

    # --- the loop: push notices and the anti-entropy poll -------------------------------

    async def notify(self, request: web.Request) -> web.Response:
        if self.listener_tls is not None and not self._from_origin(request):
            return web.json_response({"error": {"code": "not-the-origin", "message":
                                                "only the origin's push certificate may "
                                                "send notices here"}}, status=403)
        # Read only up to the manifest cap; the manifest is verified like a fetched one.
        body = await request.content.read(self.snap.max_manifest_bytes + 1)
        self.pushed = body or None
        self.wake.set()
        return web.json_response({"ok": True}, status=202)

    async def notify_allowance(self, request: web.Request) -> web.Response:
        """An allowance pushed by the origin: checked like a polled one (its signature, not
        this channel, is what is trusted)."""
        if self.listener_tls is not None and not self._from_origin(request):
            return web.json_response({"error": {"code": "not-the-origin", "message":
                                                "only the origin's push certificate may "
                                                "send allowances here"}}, status=403)
        self.allowance_pushed = await request.content.read(allowances.MAX_ALLOWANCE_BYTES + 1)
        self.allowance_wake.set()
        return web.json_response({"ok": True}, status=202)

    # --- fleet budgets: demand out, allowances in ----------------------------------------

    def _root(self) -> bytes:
        cached = self.trust.folder / "root.json"
        return (cached if cached.is_file() else self.trust.root_file).read_bytes()

    async def _poll_allowance(self, admin: EngineAdmin) -> bytes | None:
        """Reports this PoP's demand and takes its newest allowance (None: none yet)."""
        assert self.session is not None
        code, pacing = await admin.call("GET", "/pacing")
        report = allowances.demand(pacing if code == 200 else {})
        async with self.session.post(f"{self.origin}/v1/pacing", json=report,
                                     headers={POP_HEADER: self.pop.id},
                                     timeout=ClientTimeout(total=CALL_TIMEOUT)) as resp:
            if resp.status == 204:
                return None
            body = await resp.content.read(allowances.MAX_ALLOWANCE_BYTES + 1)
            if resp.status != 200:
                raise AllowanceError(f"origin answered HTTP {resp.status} for the allowance: "
                                     f"{body[:200].decode(errors='replace')}")
            return body

    async def _install_allowance(self, admin: EngineAdmin, raw: bytes) -> None:
        newer_than = self.allowance.seq if self.allowance is not None else 0
        try:
            believed = allowances.verify(raw, await asyncio.to_thread(self._root),
                                         self.pop.id, newer_than)
        except AllowanceError as exc:
            if not exc.unsigned:
                raise
            # The origin may have rotated its timestamp key: the root it signed the new one
            # into is fetched (and verified) once, then the allowance is checked again.
            try:
                await asyncio.to_thread(self.trust.refresh, self.client_tls)
            except VerifyError as refresh:
                raise AllowanceError(f"{exc.line()}; the TUF refresh failed too: "
                                     f"{refresh}") from exc
            believed = allowances.verify(raw, await asyncio.to_thread(self._root),
                                         self.pop.id, newer_than)
        code, body = await admin.call("POST", "/allowances",
                                      json.dumps(believed.signed).encode())
        if code != 200:
            raise AllowanceError(f"engine refused allowance {believed.seq}: "
                                 f"{body.get('message', body)}")
        self.allowance = believed
        await asyncio.to_thread(allowances.keep,
                                under(self.state_dir, ALLOWANCE_FILE), believed.raw)

    async def _reinstall(self, admin: EngineAdmin) -> None:
        """An engine that started again has no allowance: it gets the last one back while
        that is still good, so a restart does not stop budgeted campaigns for an interval."""
        if self.allowance is None:
            raw = await asyncio.to_thread(allowances.load, under(self.state_dir, ALLOWANCE_FILE))
            if raw is None:
                return
            try:
                self.allowance = allowances.verify(raw, await asyncio.to_thread(self._root),
                                                   self.pop.id, 0)
            except AllowanceError:
                return  # expired or from before a key change: the next poll brings one
        code, body = await admin.call("GET", "/pacing")
        if code != 200 or int(body.get("seq", 0)) >= self.allowance.seq:
            return
        if self.allowance.expires_ms <= time.time() * 1000:
            return
        code, body = await admin.call("POST", "/allowances",
                                      json.dumps(self.allowance.signed).encode())
        if code == 200:
            log.info("engine given allowance %d again (it had %s)", self.allowance.seq,
                     body.get("seq", 0))

    async def pace(self, stop: asyncio.Event) -> None:
        """Every pacing interval (as the last allowance says), or at once on a push: report
        demand, take the allowance, check it, give it to the engine. Problems are logged once
        and kept in allowance_problem; the engine keeps its last allowance until it
        expires."""
        if self.engine is None:
            return
        admin = self.engine.admin
        next_poll = 0.0
        while not stop.is_set():
            try:
                if not admin.running():
                    raise EngineAbsent  # not started yet: nothing to report or install
                await self._reinstall(admin)
                raw, pushed = self.allowance_pushed, self.allowance_pushed is not None
                self.allowance_pushed = None
                if raw is None and time.monotonic() >= next_poll:
                    raw = await self._poll_allowance(admin)
                    interval = FIRST_PACING_POLL
                    if self.allowance is not None:
                        signed = self.allowance.signed
                        interval = max(1.0, (int(signed["interval_end_ms"])
                                             - int(signed["issued_ms"])) / 1000)
                    next_poll = time.monotonic() + interval
                if raw is not None and (not pushed or raw != (
                        self.allowance.raw if self.allowance else b"")):
                    await self._install_allowance(admin, raw)
                self.allowance_problem = ""
            except EngineAbsent:
                pass
            except AllowanceError as exc:
                if self.allowance_problem != exc.line():
                    log.warning("allowance not taken: %s", exc.line())
                self.allowance_problem = exc.line()
            except (ClientError, OSError, TimeoutError, ValueError) as exc:
                line = f"allowance round failed: {exc or type(exc).__name__}"
                if self.allowance_problem != line:
                    log.warning("%s", line)
                self.allowance_problem = line
            self.allowance_wake.clear()
            waiters = [asyncio.ensure_future(self.allowance_wake.wait()),
                       asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=PACING_CHECK, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()

    @staticmethod
    def _from_origin(request: web.Request) -> bool:
        """Whether the client showed the origin's push certificate (TLS has checked it
        against the CA already: it refuses a handshake without one)."""
        from cryptography import x509  # here: x509 is for https:// origins only

        from appliance.origin.ca import is_origin

        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        return der is not None and is_origin(x509.load_der_x509_certificate(der))

    async def _listen_for_pushes(self) -> tuple[web.AppRunner, asyncio.Server] | None:
        """The push listener, or None while its address cannot be bound (the supervisor
        starts before the network is configured): polling runs meanwhile and the next round
        tries again. Slow, idle and flooding clients are held off by httpguard: only the
        origin has anything to say here."""
        guard = httpguard.Guard(PUSH_CONNECTIONS)
        app = guard.app(client_max_size=4096)
        app.add_routes([web.post("/v1/notify", self.notify),
                        web.post("/v1/allowance", self.notify_allowance)])
        runner = web.AppRunner(app, **httpguard.runner_kwargs(), access_log=None)
        await runner.setup()
        host, _, port = self.sync.push_listen.rpartition(":")
        try:
            server = await httpguard.start(runner, guard, host.strip("[]"), int(port),
                                           self.listener_tls)
        except OSError as exc:
            await runner.cleanup()
            line = (f"push listener on {self.sync.push_listen} not up yet ({exc.strerror}); "
                    "polling until it is")
            if self.state.last_logged != line:
                log.warning("%s", line)
                self.state.last_logged = line
            return None
        return runner, server

    async def _client_tls(self) -> ssl.SSLContext:
        """This PoP's client TLS for an https:// origin: its certificate, enrolled for first
        with the token of sync.enrollment_token_file when it has none yet."""
        from appliance.sync import identity  # here: x509 is for https:// origins only

        files = identity.Files.under(under(self.state_dir, self.sync.identity_dir))
        if not files.complete():
            token_file = under(self.state_dir, self.sync.enrollment_token_file)
            if not self.sync.enrollment_token_file or not token_file.exists():
                raise identity.IdentityError(
                    "this PoP has no certificate for the origin and no enrollment token"
                    + (f" at {token_file}" if self.sync.enrollment_token_file else ""),
                    hint="make one on the origin: `adpop origin pops enroll NAME --out FILE`, "
                         "and put it where sync.enrollment_token_file says (mode 0600)")
            token = secrets.read(token_file, "sync.enrollment_token_file")
            address = (self.sync.push_address or self.sync.push_listen) \
                if self.sync.push_listen else ""
            who = await identity.enroll(self.origin, token, files.key.parent, address)
            log.info("enrolled at %s as %s (group %s, push notices to %s)", self.origin,
                     who.pop, who.group, address or "nowhere: polling only")
            # Spent: nothing is left for a copy of the disk to find.
            token_file.unlink(missing_ok=True)
        self._adopt(identity.load(files))
        self.listener_tls = identity.listener_context(files)
        self.client_tls = identity.context(files)
        return self.client_tls

    def _adopt(self, who: Identity) -> None:
        """Takes the id and group the certificate names: the origin knows this PoP by them,
        whatever the configuration says (a difference is logged once)."""
        if (who.pop, who.group) == (self.pop.id, self.pop.target_group):
            return
        log.warning("this PoP's certificate names it %s in group %s; the configuration says "
                    "%s in %s: using the certificate's", who.pop, who.group, self.pop.id,
                    self.pop.target_group)
        self.pop = dataclasses.replace(self.pop, id=who.pop, target_group=who.group)
        self.load_policy()

    async def _open_session(self, stop: asyncio.Event) -> ClientSession | None:
        """The session to the origin (None once `stop` is set first): over TLS with this
        PoP's certificate for an https:// origin, retried every few seconds while the PoP
        cannot get one, saying why in state.origin_problem."""
        timeout = ClientTimeout(total=None, sock_connect=5)
        if not self.origin.startswith("https://"):
            return ClientSession(timeout=timeout)
        while not stop.is_set():
            try:
                tls = await self._client_tls()
            except AdpopError as exc:
                if self.state.origin_problem != exc.line():
                    log.warning("no identity for the origin yet: %s", exc.line())
                self.state.origin_problem = exc.line()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), IDENTITY_RETRY)
                continue
            return ClientSession(timeout=timeout, connector=TCPConnector(ssl=tls))
        return None

    async def run(self, stop: asyncio.Event) -> None:
        self.session = await self._open_session(stop)
        if self.session is None:
            return
        listener: tuple[web.AppRunner, asyncio.Server] | None = None
        push_url = ""
        pacing = asyncio.ensure_future(self.pace(stop))
        try:
            registered = False
            while not stop.is_set():
                if self.sync.push_listen and listener is None:
                    listener = await self._listen_for_pushes()
                    if listener is not None:
                        scheme = "https" if self.listener_tls is not None else "http"
                        push_url = f"{scheme}://{self.sync.push_listen}"
                        registered = False  # registered again, now with the push URL
                if not registered:
                    registered = await self.register(push_url)
                # A version on trial is watched whether or not the origin answers.
                if registered or self.store.trial() is not None:
                    # A stop request does not wait out a fetch or a health window: the
                    # attempt is cancelled at its next await, where the store is never
                    # mid-write. A version activated by then stays active, unreported.
                    attempt = asyncio.ensure_future(self.attempt())
                    stopping = asyncio.ensure_future(stop.wait())
                    await asyncio.wait([attempt, stopping], return_when=asyncio.FIRST_COMPLETED)
                    stopping.cancel()
                    if not attempt.done():
                        attempt.cancel()
                        break
                self.wake.clear()
                waiters = [asyncio.ensure_future(self.wake.wait()),
                           asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waiters, timeout=self.sync.poll_interval
                                   if registered else 1.0,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
        finally:
            pacing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacing
            if listener is not None:
                listener[1].close()
                await listener[0].cleanup()
            await self.session.close()


class EngineAbsent(Exception):
    """The engine's admin socket is not there (yet): a pacing round has nothing to do."""


class RollbackError(AdpopError):
    """No retained version to roll back to, or the engine would not take it."""


async def roll_back(store: SnapshotStore, admin: EngineAdmin | None, to: int | None) -> str:
    """Activates retained version `to` (default: the one below the active one) and tells a
    running engine to load it. The high-water mark stays, so sync never takes an older
    version back by itself. Returns what was done; raises RollbackError."""
    current = store.current_version()
    older = [v for v in store.versions() if current is None or v < current]
    target = to if to is not None else (older[-1] if older else None)
    if target is None or target not in store.versions():
        wanted = f"version {target}" if target is not None else f"version below v{current}"
        raise RollbackError(f"no retained {wanted}",
                            hint="`adpop pop snapshots` lists the retained versions")
    store.activate(target)
    store.end_trial()  # the operator's choice replaces whatever was on trial
    store.pin(target)
    engine_note = ""
    if admin is not None and admin.running():
        problem = await admin.load()
        if problem:
            raise RollbackError(f"v{target} is active on disk but {problem}",
                                hint="check the engine, then roll back again")
        engine_note = "; the engine loaded it"
    log.warning("rolled back to v%s (was v%s)", target, current)
    return (f"active: v{target} (was v{current}){engine_note}; pinned by operator until the "
            "origin publishes a version above the high-water mark")
