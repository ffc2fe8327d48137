"""`adpop origin serve`: the origin's HTTP API, its rollout loop and its push notices.

API (JSON unless said otherwise):
- GET  /v1/manifest?pop=ID       the manifest of the newest version this PoP may take (204: none)
- GET  /v1/payload/SHA256         the payload bytes: immutable, ETag, Range
- POST /v1/pops/ID/register       {"push_url", "target_group"} (without TLS only: over
                                  TLS both come from the PoP's enrollment)
- POST /v1/pops/ID/status         {"version", "sha256", "activated", "state", "error",
                                   "failed_version"}
- POST /v1/enroll                 {"token", "public_key", "push_address"}: a one-time
                                  token, the PoP's ECDSA P-256 public key (PEM) and the
                                  HOST:PORT its push listener is reached at; answers
                                  {"pop", "group", "certificate", "ca"}
- GET  /v1/ca                     the CA certificate (PEM): public, checked by the PoP
                                  against the fingerprint its enrollment token pins
- GET  /v1/tuf/NAME               TUF metadata (N.root.json, N.targets.json,
                                  N.snapshot.json, timestamp.json): what PoPs verify with

With TLS (origin.tls), the PoP routes (manifest, payload, tuf, register, status) need a client
certificate from the origin's CA that is not revoked, and take the PoP's id and group from
it: a PoP registers, reports and fetches only as itself. Every answer carries HSTS.

Operators' routes (ops.OPS: GET /v1/fleet, /v1/ops/…) need an operator token whose role
allows the action; every write is recorded with the operator's name and its outcome.

Push notices: POST {push_url}/v1/notify with the manifest of the version the PoP may take.
Over TLS they go to the address the PoP enrolled with, the origin shows its push
certificate (the only client a PoP's listener takes) and checks that the listener's
certificate is that PoP's: no registration can redirect them, and no secret is shared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from cryptography import x509

from appliance import httpguard, secrets
from appliance.config import OriginConfig, OriginSettings, Scope, build, under
from appliance.errors import AdpopError
from appliance.events.batch import BATCH_HEADER, POP_HEADER
from appliance.origin import enroll, ops, rollout
from appliance.origin.ca import Authority, CaError, Identity, identity, pop_host
from appliance.origin.db import OriginDB, PopRow, VersionRow
from appliance.origin.events import MAX_BODY_BYTES, EventStore, Refused, metrics_text, open_store
from appliance.origin.pacing import (
    DAY_MS,
    Budget,
    PacingService,
    budgets_of,
    spend_before,
    spend_today,
)

log = logging.getLogger("adpop.origin")

PUSH_ATTEMPTS = 4
LOOP_SECONDS = 0.05
# Paths whose callers must prove they are an enrolled PoP when the origin speaks TLS.
POP_ROUTES = ("/v1/manifest", "/v1/payload/", "/v1/pops/", "/v1/tuf/", "/v1/events",
              "/v1/pacing")
MAX_DEMAND_BYTES = 8 * 1024 * 1024  # a PoP's demand report: a few dozen bytes a campaign
TUF_FILE = re.compile(r"(?:[1-9][0-9]{0,9}\.)?(?:root|targets|snapshot|timestamp)\.json")
TUF_REFRESH = 60.0  # seconds between checks that snapshot and timestamp are fresh enough
HSTS = "max-age=31536000"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The enrolled PoP a request came from (TLS only): set by Origin._identify.
CALLER = web.RequestKey("caller", Identity)
OPS_MAX_BODY = 256 * 1024 * 1024  # a campaign import as JSON; only an operator's is read
OPS_BODY_TIMEOUT = 300.0  # time an operator's upload may take
# Open connections at most (lowered to fit the descriptor limit): a fleet's PoPs, their
# payload downloads and operators fit; a flood of idle sockets does not lock them out.
MAX_CONNECTIONS = 4096
EVENTS_BODY_TIMEOUT = 60.0


def _group(manifest: bytes) -> str:
    """The target group a stored manifest names ("" when it cannot be read)."""
    try:
        return str(json.loads(manifest)["signed"]["target_group"])
    except (ValueError, KeyError, TypeError):
        return ""


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class Origin:
    def __init__(self, db: OriginDB, plan: rollout.Plan, push_parallelism: int,
                 authority: Authority | None = None,
                 push_tls: ssl.SSLContext | None = None,
                 config: OriginConfig | None = None) -> None:
        self.db = db
        # What operators' actions (publish) read: the origin's whole configuration.
        self.config = config or build(Scope.ORIGIN, {("origin", "state_dir"): str(db.state_dir)})
        self.authority = authority  # None: this origin enrolls no PoPs
        # With TLS the PoP routes need the PoP's certificate, and pushes go out with this.
        self.push_tls = push_tls
        self.tls = push_tls is not None
        self.plan = plan
        self.push_slots = asyncio.Semaphore(push_parallelism)
        self.notified: dict[str, int] = {}  # PoP id -> newest version a notice went out for
        self.pushes: set[asyncio.Task[None]] = set()  # held so they are not collected mid-flight
        self.events: EventStore | None = None  # opened at start: it holds the file's lock
        self.ingest_task: asyncio.Task[None] | None = None  # events.transport = "nats"
        self.ingest_stop = asyncio.Event()
        self.session: ClientSession | None = None
        self.loop_task: asyncio.Task[None] | None = None
        self.pacing = PacingService(float(self.config.pacing.interval), self._spend,
                                    self._signer)
        self.pacing_task: asyncio.Task[None] | None = None
        self._before: tuple[int, dict[str, int]] = (-1, {})  # spend before today, by day

    def app(self, guard: httpguard.Guard | None = None) -> web.Application:
        guard = guard or httpguard.Guard(MAX_CONNECTIONS)
        # Read by their handlers once the caller is known (operators; PoPs' event batches).
        guard.streamed = ("/v1/ops/", "/v1/events", "/v1/reports", "/v1/pacing")
        app = guard.app(client_max_size=64 * 1024)
        app.middlewares.append(self._identify)
        app.add_routes([
            web.get("/v1/ca", self.get_ca),
            web.get("/v1/manifest", self.get_manifest),
            web.get("/v1/payload/{sha256}", self.get_payload),
            web.get("/v1/tuf/{name}", self.get_tuf),
            web.post("/v1/pops/{pop}/register", self.post_register),
            web.post("/v1/pops/{pop}/status", self.post_status),
            web.post("/v1/enroll", self.post_enroll),
            web.post("/v1/events", self.post_events),
            web.post("/v1/pacing", self.post_pacing),
            web.get("/metrics", self.get_metrics),
        ])
        for op in ops.OPS:
            app.router.add_route(op.method, op.path, self._operator_route(op))
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        if self.events is None:
            self.events = await asyncio.to_thread(open_store, self.db.state_dir)
        self.session = ClientSession(timeout=ClientTimeout(total=5))
        self.loop_task = asyncio.create_task(self._rollout_loop())
        self.pacing_task = asyncio.create_task(self._pacing_loop())
        events = self.config.events
        if events.transport == "nats":
            from appliance.events.nats import ingest

            self.ingest_task = asyncio.create_task(ingest(
                self.events, events.nats_url, events.ingest_workers, events.nats_replicas,
                self.ingest_stop))

    async def _stop(self, app: web.Application) -> None:
        for task in (self.loop_task, self.pacing_task):
            if task is not None:
                task.cancel()
        self.ingest_stop.set()
        if self.ingest_task is not None:
            await asyncio.gather(self.ingest_task, return_exceptions=True)
        if self.session:
            await self.session.close()
        if self.events is not None:
            self.events.close()
            self.events = None

    @web.middleware
    async def _identify(self, request: web.Request,
                        handler: Handler) -> web.StreamResponse:
        if not self.tls:
            return await handler(request)
        if request.path.startswith(POP_ROUTES):
            refused = self._peer(request)
            if isinstance(refused, web.Response):
                refused.headers["Strict-Transport-Security"] = HSTS
                return refused
            request[CALLER] = refused
        response = await handler(request)
        response.headers["Strict-Transport-Security"] = HSTS
        return response

    def _peer(self, request: web.Request) -> Identity | web.Response:
        """The enrolled PoP on the other end of this connection, or the refusal."""
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        if not der:
            return _error(401, "no-certificate", "this route needs the PoP's client "
                          "certificate; enroll it with `adpop origin pops enroll NAME`")
        try:
            who = identity(x509.load_der_x509_certificate(der))
        except (ValueError, AdpopError) as exc:
            return _error(403, "bad-certificate", str(exc))
        if not self.db.certificate_valid(who.serial):
            log.warning("refused PoP %s: certificate %x revoked or unknown", who.pop, who.serial)
            return _error(403, "revoked", f"the certificate of {who.pop} is revoked")
        return who

    @staticmethod
    def _as(request: web.Request, pop: str) -> web.Response | None:
        """A refusal when the caller's certificate names another PoP than `pop`."""
        who: Identity | None = request.get(CALLER)
        if who is not None and who.pop != pop:
            return _error(403, "not-yours", f"{who.pop} may report only about itself, "
                          f"not about {pop[:64]!r}")
        return None

    async def get_ca(self, request: web.Request) -> web.Response:
        if self.authority is None:
            return _error(404, "no-ca", "this origin has no CA")
        return web.Response(body=self.authority.pem(), content_type="application/x-pem-file")

    async def get_manifest(self, request: web.Request) -> web.StreamResponse:
        who: Identity | None = request.get(CALLER)
        pop = who.pop if who is not None else request.query.get("pop", "")
        version = rollout.assigned_version(pop, self.db.versions(), self.db.pops(), self.plan)
        body = self.db.manifest(version) if version else None
        # An enrolled PoP gets only what its group is assigned.
        if body is None or (who is not None and _group(body) != who.group):
            return web.Response(status=204)
        return web.Response(body=body, content_type="application/json",
                            headers={"X-Adpop-Version": str(version)})

    async def get_payload(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        path = self.db.payload_path(sha256)
        if path is None:
            return _error(404, "no-such-payload", "no payload with that SHA-256")
        who: Identity | None = request.get(CALLER)
        if who is not None:
            version = next((v.version for v in self.db.versions() if v.sha256 == sha256), 0)
            manifest = self.db.manifest(version) if version else None
            if manifest is None or _group(manifest) != who.group:
                return _error(403, "not-your-group", f"that payload is not for group "
                              f"{who.group}, {who.pop}'s")
        # Named by its hash, so it never changes: caches may keep it for good.
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, "
                                                                "immutable"})

    async def get_tuf(self, request: web.Request) -> web.StreamResponse:
        """The TUF metadata PoPs verify snapshots with (consistent snapshots: every file but
        timestamp.json is named by its version and never changes)."""
        name = request.match_info["name"]
        path = Path(self.db.state_dir) / "tuf" / "metadata" / name
        if not TUF_FILE.fullmatch(name) or not path.is_file():
            return _error(404, "no-such-metadata", f"no TUF metadata {name[:64]!r}")
        cache = "no-cache" if name in ("timestamp.json", "root.json") else \
            "public, max-age=31536000, immutable"
        return web.FileResponse(path, headers={"Cache-Control": cache})

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            doc = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=json.dumps(
                {"error": {"code": "bad-json", "message": str(exc)}}),
                content_type="application/json") from exc
        if not isinstance(doc, dict):
            raise web.HTTPBadRequest(text=json.dumps(
                {"error": {"code": "bad-json", "message": "expected an object"}}),
                content_type="application/json")
        return doc

    async def post_register(self, request: web.Request) -> web.Response:
        pop = request.match_info["pop"]
        if refused := self._as(request, pop):
            return refused
        doc = await self._json(request)
        who: Identity | None = request.get(CALLER)
        if who is not None:
            claimed = doc.get("target_group", who.group)
            if claimed != who.group:
                return _error(403, "not-your-group", f"{who.pop} is enrolled in group "
                              f"{who.group}, not {str(claimed)[:64]!r}; enroll it again to "
                              "move it")
            # An enrolled PoP's group and push address are the ones it enrolled with, not
            # what it says now.
            address = self.db.push_address(who.serial)
            group, push_url = who.group, f"https://{address}" if address else ""
        else:
            group, push_url = str(doc.get("target_group", "")), str(doc.get("push_url", ""))
        self.db.register(pop, push_url, group)
        log.info("PoP %s registered (push %s)", pop, push_url or "-")
        return web.json_response({"ok": True})

    async def post_status(self, request: web.Request) -> web.Response:
        if refused := self._as(request, request.match_info["pop"]):
            return refused
        doc = await self._json(request)
        try:
            self.db.report(request.match_info["pop"], doc)
        except AdpopError as exc:
            return _error(404, "unknown-pop", exc.line())
        return web.json_response({"ok": True})

    async def post_events(self, request: web.Request) -> web.Response:
        """A batch of a PoP's events (appliance/origin/events.py): answered 200 only once it
        is committed, or once it was before; a refusal names its reason."""
        store = self.events
        if store is None:
            return _error(503, "starting", "the event store is not open yet")
        who: Identity | None = request.get(CALLER)
        # Over TLS the certificate says who sends; without (loopback development) the PoP
        # names itself, and must be one that registered.
        pop = who.pop if who is not None else request.headers.get(POP_HEADER, "")
        if who is None and not self.db.pops([pop]):
            store.counts.refused["unknown-pop"] += 1
            return _error(403, "unknown-pop", f"no registered PoP {pop[:64]!r} sends events "
                          "here")
        raw = bytearray()
        try:
            async with asyncio.timeout(EVENTS_BODY_TIMEOUT):
                while len(raw) <= MAX_BODY_BYTES:
                    chunk = await request.content.read(1 << 20)
                    if not chunk:
                        break
                    raw += chunk
        except TimeoutError:
            return _error(408, "too-slow", "the batch did not arrive in time")
        try:
            done = await asyncio.to_thread(store.store, pop,
                                           request.headers.get(BATCH_HEADER, ""), bytes(raw))
        except Refused as exc:
            log.warning("refused a batch from %s: %s", pop, exc.line())
            return _error(exc.status, exc.reason, exc.line())
        return web.json_response(asdict(done))

    async def post_pacing(self, request: web.Request) -> web.Response:
        """A PoP's demand report; answered with its newest signed allowance (204: none yet,
        the PoP is heard from now and gets one next round)."""
        who: Identity | None = request.get(CALLER)
        pop = who.pop if who is not None else request.headers.get(POP_HEADER, "")
        if who is None and not self.db.pops([pop]):
            return _error(403, "unknown-pop", f"no registered PoP {pop[:64]!r} reports here")
        raw = await request.content.read(MAX_DEMAND_BYTES + 1)
        if len(raw) > MAX_DEMAND_BYTES:
            return _error(413, "too-large", f"a demand report is at most {MAX_DEMAND_BYTES} "
                          "bytes")
        try:
            doc = json.loads(raw)
            day = int(doc["day"])
            rows = doc["campaigns"]
            counts = {str(c): (int(r["eligible"]), int(r["throttled"])) for c, r in rows.items()}
            spent = {str(c): int(r.get("spent_micros", 0)) for c, r in rows.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, "bad-report", f"demand report: {exc}; send "
                          '{"day": D, "campaigns": {ID: {"eligible": N, "throttled": N}}}')
        self.pacing.demand.report(pop, day, counts, time.time(), spent)
        signed = self.pacing.allowance(pop)
        if signed is None:
            return web.Response(status=204)
        return web.Response(body=signed, content_type="application/json")

    # --- fleet budgets ---------------------------------------------------------------------

    def _spend(self, day: int) -> dict[tuple[str, str], int]:
        if self.events is None:
            return {}
        with self.events.reader() as cursor:
            return spend_today(cursor, day)

    def _signer(self) -> Any:
        from appliance.origin.publish import repository

        return repository(self.config).online_signer()

    def _budgets(self, now: float) -> list[Budget]:
        """Read on the loop's thread (the campaign store is its SQLite connection)."""
        day = int(now * 1000) // DAY_MS
        if self._before[0] != day and self.events is not None:
            with self.events.reader() as cursor:
                self._before = (day, spend_before(cursor, day))
        campaigns = self.db.campaign_set().campaigns
        return budgets_of([c for c in campaigns if not c.paused], (), self._before[1], now)

    async def _pacing_loop(self) -> None:
        """A round every pacing.interval; each PoP's allowance pushed where it listens."""
        interval = float(self.config.pacing.interval)
        while True:
            started = time.monotonic()
            try:
                budgets = self._budgets(time.time())
                signed = await asyncio.to_thread(self.pacing.round, budgets)
                for pop in self.db.pops(list(signed)):
                    if pop.push_url:
                        task = asyncio.create_task(self._push_allowance(pop.id, pop.push_url,
                                                                        signed[pop.id]))
                        self.pushes.add(task)
                        task.add_done_callback(self.pushes.discard)
            except AdpopError as exc:
                log.error("pacing round: %s", exc.line())
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _push_allowance(self, pop: str, url: str, body: bytes) -> None:
        """One try: an allowance missed here is in the PoP's next poll anyway."""
        tls: dict[str, Any] = {"ssl": self.push_tls, "server_hostname": pop_host(pop)} \
            if url.startswith("https://") and self.push_tls is not None else {}
        try:
            async with self.push_slots:
                assert self.session is not None
                async with self.session.post(f"{url}/v1/allowance", data=body,
                                             headers={"Content-Type": "application/json"},
                                             **tls) as resp:
                    await resp.read()
        except (TimeoutError, ClientError, ssl.SSLError) as exc:
            log.debug("allowance push to %s failed: %s", pop, exc or type(exc).__name__)

    async def get_metrics(self, request: web.Request) -> web.Response:
        text = metrics_text(self.events.counts) if self.events is not None else ""
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def post_enroll(self, request: web.Request) -> web.Response:
        """A token and a public key for a certificate; answered only once the certificate
        is recorded (a revocation must be able to find it)."""
        if self.authority is None:
            return _error(404, "no-enrollment", "this origin has no CA to enroll PoPs with")
        doc = await self._json(request)
        presented, key = doc.get("token"), doc.get("public_key")
        address = doc.get("push_address", "")
        if not isinstance(presented, str) or not isinstance(key, str) or \
                not isinstance(address, str):
            return _error(400, "bad-request", 'send {"token": "...", "public_key": "PEM", '
                          '"push_address": "HOST:PORT"}')
        try:
            # On this loop's thread and connection: one ECDSA signature, and a transaction
            # that must not interleave with another on the same connection.
            done = enroll.exchange(self.db, self.authority, presented, key.encode(), address)
        except CaError as exc:
            return _error(400, "bad-key", exc.line())
        except enroll.EnrollError as exc:
            return _error(400, "bad-push-address", exc.line())
        except AdpopError as exc:
            log.warning("enrollment refused from %s: %s", request.remote, exc.message)
            return _error(403, "enrollment-refused", exc.line())
        log.info("PoP %s enrolled into group %s from %s", done.pop, done.group, request.remote)
        return web.json_response({"pop": done.pop, "group": done.group,
                                  "certificate": done.certificate.decode(),
                                  "ca": done.ca.decode()})

    def _operator_route(self, op: ops.Op) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            params = dict(request.match_info)
            try:
                operator, role = ops.authenticate(self.db,
                                                  request.headers.get("Authorization", ""))
                ops.permit(op, ops.Context(self.db, self.config, self.authority), operator,
                           role, params)
            except ops.Refused as exc:
                log.warning("%s refused from %s: %s", op.name, request.remote, exc.message)
                return _error(exc.status, "unauthorized" if exc.status == 401 else "forbidden",
                              exc.line())
            # Read only once the caller is known, and only up to the cap: a campaign import
            # is large, an anonymous body is not read at all.
            raw = bytearray()
            try:
                async with asyncio.timeout(OPS_BODY_TIMEOUT):
                    while op.writes and len(raw) <= OPS_MAX_BODY:
                        chunk = await request.content.read(1 << 20)
                        if not chunk:
                            break
                        raw += chunk
            except TimeoutError:
                return _error(408, "too-slow", f"the body did not arrive within "
                              f"{OPS_BODY_TIMEOUT:.0f} s")
            if len(raw) > OPS_MAX_BODY:
                return _error(413, "too-large", f"the body passed {OPS_MAX_BODY} bytes")
            if not op.writes:
                # A read's parameters are its query (GET /v1/reports?by=pop).
                raw = bytearray(json.dumps(dict(request.query)).encode())
            try:
                answer = await asyncio.to_thread(self._run_op, op, operator, params, bytes(raw))
            except ops.OpsError as exc:
                return _error(exc.status, "refused", exc.line())
            except AdpopError as exc:
                return _error(409, "refused", exc.line())
            if op.writes:
                log.info("%s by %s (%s): ok", op.name, operator, ",".join(params.values()))
            return web.json_response(answer)

        return handle

    def _run_op(self, op: ops.Op, operator: str, params: dict[str, str],
                raw: bytes) -> ops.Json:
        """Runs in a thread, on a connection of its own (a publish compiles for seconds;
        the API and the rollout loop go on meanwhile)."""
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise ops.OpsError(f"the body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ops.OpsError("the body must be a JSON object")
        db = OriginDB(self.db.state_dir)
        try:
            return ops.run(op, ops.Context(db, self.config, self.authority, self.events,
                                           self.pacing),
                           operator, params, body)
        finally:
            db.close()

    # --- rollouts and push notices -----------------------------------------------------

    async def _rollout_loop(self) -> None:
        refreshed = 0.0
        while True:
            if time.monotonic() - refreshed > TUF_REFRESH:
                refreshed = time.monotonic()
                try:
                    await asyncio.to_thread(self._refresh_tuf)
                except AdpopError as exc:
                    log.error("TUF metadata not refreshed: %s", exc.line())
            try:
                # One read of the tables per tick, again only when a stage moved.
                versions, pops = self.db.versions(), self.db.pops()
                changes = rollout.advance(self.db, self.plan, versions, pops)
                for version, stage in changes:
                    log.info("version %d: stage %s", version, stage)
                self._notify_due(self.db.versions() if changes else versions, pops)
            except AdpopError as exc:
                log.error("rollout loop: %s", exc.line())
            await asyncio.sleep(LOOP_SECONDS)

    def _refresh_tuf(self) -> None:
        """Snapshot and timestamp re-signed before they expire (a PoP would call the origin
        frozen otherwise)."""
        from appliance.origin.publish import repository

        with self.db.exclusive():
            if repository(self.config).refresh_online():
                log.info("TUF snapshot and timestamp signed anew")

    def _notify_due(self, versions: Sequence[VersionRow], pops: Sequence[PopRow]) -> None:
        for pop in pops:
            want = rollout.assigned_version(pop.id, versions, pops, self.plan)
            if want > max(pop.version, self.notified.get(pop.id, 0)) and pop.push_url:
                self.notified[pop.id] = want
                task = asyncio.create_task(self._push(pop.id, pop.push_url, want))
                self.pushes.add(task)
                task.add_done_callback(self.pushes.discard)

    async def _push(self, pop: str, url: str, version: int) -> None:
        headers = {"Content-Type": "application/json"}
        manifest = self.db.manifest(version) or b""
        # Over TLS the listener must prove it is this PoP: its certificate names pop_host.
        tls: dict[str, Any] = {"ssl": self.push_tls, "server_hostname": pop_host(pop)} \
            if url.startswith("https://") and self.push_tls is not None else {}
        for attempt in range(PUSH_ATTEMPTS):
            try:
                async with self.push_slots:
                    assert self.session is not None
                    # The notice carries the manifest itself: the PoP verifies its signature
                    # and needs no round trip for it; the channel is never what it trusts.
                    async with self.session.post(f"{url}/v1/notify", data=manifest,
                                                 headers=headers, **tls) as resp:
                        if resp.status < 300:
                            return
                        detail = f"HTTP {resp.status}"
            except (TimeoutError, ClientError, ssl.SSLError) as exc:
                detail = str(exc) or type(exc).__name__
            # Exponential backoff with full jitter, so a fleet that was down does not come
            # back to a thundering herd of retries.
            await asyncio.sleep(random.uniform(0, 0.2 * 2 ** attempt))
        log.warning("push to %s for v%d failed %d times (%s); its poll will catch up",
                    pop, version, PUSH_ATTEMPTS, detail)


def server_context(settings: OriginSettings, authority: Authority) -> ssl.SSLContext | None:
    """The API's TLS as origin.tls says (None: plain HTTP): TLS 1.2 at least, and a client
    certificate from the CA asked for (optional: enrollment comes without one)."""
    if settings.tls == "off":
        return None
    if settings.tls == "private-ca":
        key, cert = authority.issue_server(settings.tls_hosts)
        folder = Path(settings.state_dir) / "ca"
        secrets.write(folder / "server.key", key.decode())
        (folder / "server.pem").write_bytes(cert)
        cert_file, key_file = folder / "server.pem", folder / "server.key"
    else:
        cert_file = under(settings.state_dir, settings.tls_cert)
        key_file = under(settings.state_dir, settings.tls_key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise AdpopError(f"cannot load the origin's TLS certificate {cert_file}: {exc}",
                         hint="check origin.tls_cert and origin.tls_key") from exc
    ctx.load_verify_locations(cadata=authority.pem().decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def push_context(authority: Authority, folder: Path) -> ssl.SSLContext:
    """The TLS the origin pushes with: it trusts only its CA (PoPs' listeners show the
    certificates it issued) and shows its push certificate, made anew at each start."""
    key, cert = authority.issue_push_client()
    secrets.write(folder / "push.key", key.decode())
    secrets.write(folder / "push.pem", cert.decode())
    ctx = ssl.create_default_context(cadata=authority.pem().decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(folder / "push.pem", folder / "push.key")
    return ctx


def serve(db: OriginDB, config: OriginConfig, listen: str, authority: Authority | None = None,
          tls: ssl.SSLContext | None = None) -> None:
    """Serves until SIGTERM or SIGINT; raises AdpopError when `listen` cannot be bound."""
    push_tls = push_context(authority, Path(db.state_dir) / "ca") \
        if tls is not None and authority is not None else None
    origin = Origin(db, rollout.plan_from_config(config), config.origin.push_parallelism,
                    authority, push_tls, config)
    started = time.monotonic()
    asyncio.run(_serve(origin, listen, tls))
    log.info("origin stopped after %.0f s", time.monotonic() - started)


async def _serve(origin: Origin, listen: str, tls: ssl.SSLContext | None = None) -> None:
    loop = asyncio.get_running_loop()
    httpguard.quiet_floods(loop)
    guard = httpguard.Guard(MAX_CONNECTIONS)
    runner = web.AppRunner(origin.app(guard), **httpguard.runner_kwargs())
    await runner.setup()
    host, _, port = listen.rpartition(":")
    try:
        server = await httpguard.start(runner, guard, host.strip("[]"), int(port), tls)
    except OSError as exc:
        await runner.cleanup()
        raise AdpopError(f"the origin cannot listen on {listen}: {exc.strerror}",
                         hint="stop what uses the port, or set origin.listen") from exc
    log.info("origin listening on %s, %d versions published, at most %d connections",
             listen, len(origin.db.versions()), guard.cap)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await runner.cleanup()
