"""The control API: HTTP + JSON over a Unix socket, the one door operators (and the console)
use. Socket mode 0660; every write logs the caller's uid from SO_PEERCRED.

Read:  GET  /v1/status /v1/snapshots /v1/snapshots/diff?version=N /v1/tuning /v1/xdp
           /v1/cache /v1/events /v1/logs?lines=N&component=NAME
Write: POST /v1/sync-now /v1/rollback {"to": N} /v1/drain /v1/undrain /v1/tuning/apply
            /v1/xdp/block {"cidrs": [...]} /v1/xdp/unblock {"cidrs": [...]}
Errors: {"error": {"code": "...", "message": "..."}} with a 4xx or 5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, web

from appliance.errors import AdpopError
from appliance.parts import control_socket
from appliance.snapshot import diff as snapshot_diff
from appliance.supervisor.core import Supervisor
from appliance.tuning import plan
from appliance.tuning.host import Host
from appliance.xdp import Filter, parse_cidr

if TYPE_CHECKING:  # annotations only: the schema is for type checkers and tests
    from appliance.supervisor import schema

log = logging.getLogger("adpop.supervisor")

BLOCKLIST_RECOUNT = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Every route: method, path, handler. appliance/supervisor/schema.py types each answer; a
# test holds both, the real supervisor and the console's fake to the same list.
ROUTES = (
    ("GET", "/v1/status", "status"), ("GET", "/v1/snapshots", "snapshots"),
    ("GET", "/v1/snapshots/diff", "snapshot_diff"), ("GET", "/v1/cache", "cache"),
    ("GET", "/v1/events", "events"), ("GET", "/v1/logs", "logs"),
    ("GET", "/v1/tuning", "tuning"), ("POST", "/v1/tuning/apply", "apply_tuning"),
    ("GET", "/v1/xdp", "xdp"), ("POST", "/v1/xdp/block", "xdp_block"),
    ("POST", "/v1/xdp/unblock", "xdp_block"), ("POST", "/v1/sync-now", "sync_now"),
    ("POST", "/v1/rollback", "rollback"), ("POST", "/v1/drain", "drain"),
    ("POST", "/v1/undrain", "undrain"),
)


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def written(message: str, ok: bool = True, drifting: list[str] | None = None) -> web.Response:
    """A write's answer (schema.WriteResult)."""
    body: schema.WriteResult = {"ok": ok, "message": message}
    if drifting is not None:
        body["drifting"] = drifting
    return web.json_response(body)


def peer_uid(request: web.Request) -> int | None:
    """The connecting process's uid, from the kernel (SO_PEERCRED), not from the request."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.path = control_socket(supervisor.cfg)
        self.runner: web.AppRunner | None = None
        self.campaign_cache: dict[str, dict[str, Any]] = {}
        self.blocked: tuple[float, dict[str, int]] | None = None  # (when, blocklist sizes)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024, middlewares=[self._errors])
        app.add_routes([web.route(method, path, getattr(self, handler))
                        for method, path, handler in ROUTES])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # left by a supervisor that was killed
        await web.UnixSite(self.runner, str(self.path)).start()
        os.chmod(self.path, 0o660)
        group = self.supervisor.cfg.supervisor.operator_group
        if group:
            try:
                os.chown(self.path, -1, grp.getgrnam(group).gr_gid)
            except KeyError:
                log.error("operator group %r does not exist; the control socket keeps the "
                          "supervisor's group", group)
        log.info("control API on %s", self.path)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.path.unlink(missing_ok=True)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await self._answer(request, handler)
        self._audit(request, response)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return error(404, "not_found", f"no route {request.method} {request.path}; "
                             "see `adpop status --help`")
            return error(exc.status, "bad_request", exc.reason)
        except AdpopError as exc:
            return error(409, "refused", exc.line())
        except (TimeoutError, ClientError, OSError) as exc:
            return error(503, "engine_unavailable", f"engine: {exc or type(exc).__name__}")

    @staticmethod
    def _write(request: web.Request, action: str) -> None:
        """Names the write this request asks for; it is logged once its outcome is known."""
        request["action"] = action

    @staticmethod
    def _audit(request: web.Request, response: web.StreamResponse) -> None:
        # Every write is logged with the caller's uid, and a refused one as refused: the
        # journal must never say an operator did what the PoP would not do.
        action = request.get("action")
        if action is None:
            return
        uid = peer_uid(request)
        extra = {"operator_uid": uid}
        if response.status < 400:
            log.info("control: %s by uid %s", action, uid, extra=extra)
            return
        why = ""
        if isinstance(response, web.Response) and response.text:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                why = str(json.loads(response.text)["error"]["message"])
        log.warning("control: %s refused for uid %s: %s", action, uid,
                    why or f"HTTP {response.status}", extra=extra)

    # --- reads ------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.supervisor.status())

    def _campaigns(self, version: int) -> dict[str, Any]:
        """A version's campaigns, read once per payload hash (payloads never change)."""
        store = self.supervisor.store
        sha = store.manifest(version).payload_sha256
        if sha not in self.campaign_cache:
            _, payload = store.read(version)
            self.campaign_cache[sha] = snapshot_diff.campaigns(payload)
        return self.campaign_cache[sha]

    def _snapshot_rows(self) -> schema.Snapshots:
        store = self.supervisor.store
        active = store.current_version()
        sync = self.supervisor.agent.state
        rows: list[schema.SnapshotRow] = []
        for version in store.versions():
            manifest = store.manifest(version)
            state = ("active" if version == active else
                     "failed" if version == sync.failed_version else "retained")
            rows.append({"version": version, "sha256": manifest.payload_sha256,
                         "bytes": manifest.payload_length, "created": manifest.created,
                         "campaigns": len(self._campaigns(version)),
                         "activated": sync.activated if version == active else None,
                         "active": version == active, "state": state})
        return {"active": active, "snapshots": rows}

    async def snapshots(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._snapshot_rows))

    async def snapshot_diff(self, request: web.Request) -> web.Response:
        """GET /v1/snapshots/diff?version=N: campaigns added, removed and changed in the
        active version against N (what a rollback to N would undo)."""
        store = self.supervisor.store
        try:
            version = int(request.query["version"])
        except (KeyError, ValueError):
            return error(400, "bad_request", "give ?version=N")
        active = store.current_version()
        if active is None or version not in store.versions():
            return error(404, "not_found", f"no retained version {version} (or none active)")
        old, new = await asyncio.to_thread(lambda: (self._campaigns(version),
                                                    self._campaigns(active)))
        return web.json_response({"from": version, "to": active,
                                  **snapshot_diff.diff(old, new)})

    async def cache(self, request: web.Request) -> web.Response:
        c = self.supervisor.component("cache")
        return web.json_response({"address": self.supervisor.cfg.cache.address, "ok": c.last.ok,
                                  "reason": c.last.reason, **c.last.details})

    async def events(self, request: web.Request) -> web.Response:
        s = self.supervisor
        # The backlog the health round counted (each second): the console asks every
        # refresh, and listing the spool folder once per round is enough.
        body: schema.Events = {
            "engine": s.engine_status.get("events", {}), "spool": s.engine_status.get("spool", {}),
            "closed_segments": s.backlog.segments, "backlog_bytes": s.backlog.size,
            "warn_bytes": s.cfg.engine.spool_warn_bytes}
        return web.json_response(body)

    async def logs(self, request: web.Request) -> web.Response:
        try:
            count = int(request.query.get("lines", "200"))
        except ValueError:
            return error(400, "bad_request", "lines must be a whole number")
        component = request.query.get("component")
        lines = [line for line in self.supervisor.recent.lines
                 if component is None or line["component"] == component]
        body: schema.Logs = {"lines": lines[-count:] if count > 0 else []}
        return web.json_response(body)

    async def tuning(self, request: web.Request) -> web.Response:
        """The drift watcher's state and every knob's current and desired value."""
        s = self.supervisor
        body: dict[str, Any] = {"status": s.tuning_status()}
        try:
            host = s.tuning.host if s.tuning else Host()
            want, body["knobs"] = await asyncio.to_thread(plan.report, s.cfg, host)
            body["shard_cpus"] = list(want.layout.shard_cpus)
            body["housekeeping_cpus"] = sorted(want.layout.housekeeping)
        except AdpopError as exc:
            body["knobs"], body["error"] = [], exc.line()
        return web.json_response(body)

    def _xdp_status(self) -> dict[str, Any]:
        # The console asks every second; counting the blocklist walks every key (100k
        # syscalls), so the count is redone at most every BLOCKLIST_RECOUNT seconds and after
        # this API's own block and unblock. Counters and top sources are always fresh.
        c = self.supervisor.cfg
        flt = Filter(c.xdp, c.tuning.local_port_range)
        now = time.monotonic()
        if flt.pinned() and (self.blocked is None or now - self.blocked[0] > BLOCKLIST_RECOUNT):
            self.blocked = (now, flt.blocked())
        return flt.status(self.blocked[1] if self.blocked else None)

    async def xdp(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._xdp_status))

    # --- writes -----------------------------------------------------------------------

    async def xdp_block(self, request: web.Request) -> web.Response:
        block = request.path.endswith("/block")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return error(400, "bad_request", 'the body must be JSON: {"cidrs": ["198.18.0.0/15"]}')
        cidrs = body.get("cidrs") if isinstance(body, dict) else None
        if not isinstance(cidrs, list) or not cidrs or not all(isinstance(c, str) for c in cidrs):
            return error(400, "bad_request", '"cidrs" must be a list of CIDR strings')
        nets = [parse_cidr(c) for c in cidrs]  # every one checked before any is written
        self._write(request, f"{'block' if block else 'unblock'} {', '.join(cidrs)}")
        c = self.supervisor.cfg
        flt = Filter(c.xdp, c.tuning.local_port_range)
        count = await asyncio.to_thread(flt.block if block else flt.unblock, nets)
        self.blocked = None  # recounted at the next read
        verb = "blocked" if block else "unblocked"
        return written(f"{verb} {count} of {len(nets)} CIDRs")

    async def apply_tuning(self, request: web.Request) -> web.Response:
        s = self.supervisor
        if s.tuning is None:
            return error(409, "tuning_off", s.tuning_status()["reason"])
        self._write(request, "apply tuning")
        message = await s.tuning.repair()
        drifted = await s.tuning.check("operator apply")
        return written(message, ok=not drifted, drifting=drifted)

    async def sync_now(self, request: web.Request) -> web.Response:
        self._write(request, "sync now")
        return written(self.supervisor.sync_now())

    async def rollback(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return error(400, "bad_request", 'the body must be JSON, e.g. {"to": 3}')
        to = body.get("to")
        if to is not None and (isinstance(to, bool) or not isinstance(to, int)):
            return error(400, "bad_request", '"to" must be a version number')
        self._write(request, f"rollback to {to if to is not None else 'the previous version'}")
        return written(await self.supervisor.rollback(to))

    async def drain(self, request: web.Request) -> web.Response:
        self._write(request, "drain")
        return written(await self.supervisor.set_draining(True))

    async def undrain(self, request: web.Request) -> web.Response:
        self._write(request, "undrain")
        return written(await self.supervisor.set_draining(False))
