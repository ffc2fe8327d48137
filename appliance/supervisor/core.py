"""The supervisor: brings the PoP to serving, keeps it there, and answers the control API.

One health loop probes every part, restarts what stopped, refreshes STATUS= and, only from
that loop, pings the systemd watchdog: a hung loop stops the pings and systemd restarts the
supervisor. READY=1 goes out once the cache answers, the engine is healthy and serves the
active verified snapshot -- or, after supervisor.ready_timeout, in a degraded state whose
STATUS says what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import ClientError

from appliance import cache, cpulist, spool, units
from appliance.config import ApplianceConfig
from appliance.errors import AdpopError
from appliance.parts import engine_command, engine_socket, state_path
from appliance.snapshot.store import SnapshotStore
from appliance.supervisor.components import (
    ChildProcess,
    Component,
    Health,
    SystemdUnit,
    TaskRunner,
    systemctl,
    unit_properties,
)
from appliance.supervisor.notify import Context, RecentLines, notify, watchdog_interval
from appliance.sync.agent import SyncAgent, roll_back
from appliance.sync.engine import EngineAdmin, judge
from appliance.tuning.drift import DriftWatcher
from appliance.tuning.host import Host
from appliance.xdp import Filter

if TYPE_CHECKING:  # annotations only: the schema is for type checkers and tests
    from appliance.events.shipper import Shipper, Transport
    from appliance.supervisor.schema import Status

log = logging.getLogger("adpop.supervisor")


TUNE_UNIT = "adpop-tune.service"
XDP_UNIT = "adpop-xdp.service"
TUNE_WAIT = 300.0  # seconds the first drift check waits for the boot's tuning at most
# adpop-engine exits 2 on flags it refuses (the unit's RestartPreventExitStatus= too).
ENGINE_CONFIG_STATUS = 2
SYNC_STABLE = 60.0  # a restarted sync loop running this long is no longer a gap


def in_container() -> bool:
    """True under systemd-nspawn, docker and the like (systemd as PID 1 notes it there)."""
    return Path("/run/systemd/container").exists()


class Server(Protocol):
    """What the supervisor needs of its control server: started once, stopped at the end."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Supervisor:
    def __init__(self, appliance: ApplianceConfig, store: SnapshotStore,
                 context: Context | None = None,
                 recent: RecentLines | None = None,
                 components: list[Component] | None = None,
                 tuning: DriftWatcher | None = None, keep_parts: bool = False) -> None:
        """`keep_parts` (dev mode): the engine and the cache outlive this supervisor, and the
        next one adopts them, as under systemd where each is its own unit."""
        # Sync tells the engine the supervisor runs, whatever the file left unset.
        self.cfg = replace(appliance, engine=replace(appliance.engine,
                                                     admin_socket=str(engine_socket(appliance))))
        self.store = store
        self.context = context or Context()
        self.recent = recent or RecentLines()
        self.admin = EngineAdmin(self.cfg.engine.admin_socket)
        self.agent = SyncAgent.from_config(self.cfg, store)
        self.keep_parts = keep_parts
        # Made at the first start (dev mode; adpop-secrets.service in the appliance, which
        # this repeats harmlessly), read by the cache's probe.
        self.cache_password = cache.write_secrets(state_path(self.cfg,
                                                             self.cfg.cache.password_file))
        self.components = components if components is not None else self._components()
        # Drift is watched where adpop tunes the host: the appliance, on its own machine (dev
        # hosts and containers are left be).
        watch = (self.cfg.tuning.drift_check and self.cfg.supervisor.mode == "appliance"
                 and not in_container())
        self.tuning = tuning or (DriftWatcher(self.cfg, self.apply_tuning,
                                              applied=self.tuning_applied) if watch else None)
        self.started = time.monotonic()
        self.ready_sent = False  # READY=1 goes out once, serving or degraded
        self.gaps = ["not checked yet"]  # what the last health round found missing
        self.backlog = spool.Backlog(0, 0)
        self.events_warning = ""
        self.checked_at = 0.0  # wall time of the last health round, for staleness
        self.draining = False
        self.summary = "starting"
        self.engine_status: dict[str, Any] = {}
        self.sync_task: asyncio.Future[None] | None = None
        self.stop: asyncio.Event | None = None
        self.sync_problem = ""  # why the sync loop last ended by itself
        self.sync_restarted = 0.0
        self.shipper: Shipper | None = None

    # --- the parts --------------------------------------------------------------------

    def _components(self) -> list[Component]:
        dev = self.cfg.supervisor.mode == "dev"
        address = self.cfg.cache.address
        cache.parse_address(address)  # a bad address is a config error now, not a loop later
        logs = state_path(self.cfg, "logs")
        if dev:
            state_path(self.cfg, "cache").mkdir(parents=True, exist_ok=True)
        run = state_path(self.cfg, "run")

        def pid_path(name: str) -> Path | None:
            return run / f"{name}.pid" if self.keep_parts else None

        password_file = state_path(self.cfg, self.cfg.cache.password_file)
        cache_runner = (ChildProcess(cache.redis_argv(self.cfg.cache.binary, address,
                                                      self.cfg.cache.memory,
                                                      state_path(self.cfg, "cache"),
                                                      password_file.parent),
                                     logs / "cache.log", pid_path("cache"))
                        if dev else SystemdUnit(self.cfg.cache.unit or cache.appliance_unit()))
        engine_runner = (EngineProcess(self, logs / "engine.log", pid_path("engine")) if dev
                         else EngineUnit(self.cfg.engine.unit, self.store, self.agent))
        parts = [Component("cache", cache_runner, self._cache_health),
                 Component("engine", engine_runner, self._engine_health),
                 Component("shipper", TaskRunner("shipper", self._ship), self._shipper_health)]
        if not dev and not in_container():  # a dev host's NICs are left alone
            parts.append(Component("xdp", SystemdUnit(XDP_UNIT), self._xdp_health))
        return parts

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    async def _cache_health(self) -> Health:
        probe = asdict(await cache.probe(self.cfg.cache.address, self.cache_password))
        return Health(probe.pop("ok"), probe.pop("reason"), probe)

    async def _xdp_health(self) -> Health:
        def look() -> Health:
            flt = Filter(self.cfg.xdp, self.cfg.tuning.local_port_range)
            nics = list(self.cfg.xdp.nics) or Host().serving_nics(list(self.cfg.tuning.nics))
            modes = flt.attached_now(nics)
            missing = [nic for nic, mode in modes.items() if not mode]
            details = {"attached": modes, "pinned": flt.pinned()}
            if missing:
                return Health(False, f"not attached to {', '.join(missing)}", details)
            return Health(True, "", details)

        try:
            return await asyncio.to_thread(look)
        except AdpopError as exc:
            return Health(False, exc.line())

    async def _ship(self, stop: asyncio.Event) -> None:
        """The shipper's life (appliance/events/shipper.py): once this PoP knows who it is
        at the origin (enrolled, for https://), batches go out until `stop`."""
        from appliance.events.shipper import Shipper

        while self.agent.origin.startswith("https://") and self.agent.client_tls is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return
        folder = state_path(self.cfg, self.cfg.engine.spool)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        self.shipper = Shipper(folder, self.agent.pop.id, self._transport(),
                               self.cfg.events.batch_bytes, self.cfg.events.in_flight_bytes)
        await self.shipper.run(stop)

    def _transport(self) -> Transport:
        events = self.cfg.events
        if events.transport == "nats":
            from appliance.events.nats import NatsTransport

            return NatsTransport(events.nats_url)
        from appliance.events.transport import HttpTransport

        return HttpTransport(self.agent.origin, self.agent.pop.id, self.agent.client_tls)

    async def _shipper_health(self) -> Health:
        # Shipping trouble degrades the PoP (spool_warning) but never stops it serving.
        details = self.shipper.status() if self.shipper is not None else {}
        return Health(True, "", details)

    async def _engine_health(self) -> Health:
        try:
            status = await self.admin.status()
        except (TimeoutError, ClientError, OSError) as exc:
            return Health(False, f"engine admin socket not answering: {exc or type(exc).__name__}")
        self.engine_status = status
        active = self.store.current_version()
        version = int(status.get("version", 0))
        details = {"version": version, "requests": status.get("requests", 0),
                   "requests_per_second": status.get("requests_per_second", 0.0),
                   "latency_us": status.get("latency_us", {}),
                   "connections": status.get("connections", 0),
                   "draining": status.get("draining", False)}
        verdict = judge(status, active)
        if not verdict.ok and active is not None and version != active:
            return Health(False, await self._reconcile(verdict.reason, active), details)
        if self.draining and not status.get("draining"):
            await self.admin.call("POST", "/drain")  # a restarted engine is drained again
        return Health(verdict.ok, verdict.reason, details)

    async def _reconcile(self, reason: str, active: int) -> str:
        """The engine serves another version than `current` names (a crash between the two,
        or a load that never reached it; `reason` says which): it is told to load `current`;
        when it refuses, the active version's files are checked and a damaged one replaced.
        A health window in progress owns the engine: it loads and judges the version
        itself."""
        # The trial is marked before `current` switches (in sync's thread): a round between
        # the switch and the window's start must leave the engine to the window too.
        if self.agent.state.state == "checking" or self.store.trial() is not None:
            return reason
        problem = await self.admin.load()
        if not problem:
            log.warning("%s: told it to load v%d", reason, active,
                        extra={"component": "engine"})
            return f"{reason}; told it to load v{active}"
        repaired = await self.agent.repair_current()
        return f"{reason}; {repaired or problem}"

    # --- health loop, readiness, status -----------------------------------------------

    def missing(self) -> list[str]:
        """What stands between this PoP and serving, one phrase each."""
        gaps = [f"{c.name}: {c.last.reason or 'unhealthy'}" for c in self.components
                if not c.last.ok]
        if self.sync_problem:
            gaps.append(self.sync_problem)
        if self.store.current_version() is None:
            why = self.agent.state.error or self.agent.state.origin_problem
            gaps.append("no verified snapshot yet" + (f" ({why})" if why else ""))
        return gaps

    @property
    def warnings(self) -> list[str]:
        """What the last round found wrong that does not stop serving (degraded, yet ready)."""
        return [w for w in (self.events_warning,) if w]

    def spool_warning(self) -> str:
        """Events not reaching the origin: the engine shedding (spool full), a backlog past
        engine.spool_warn_bytes, or deliveries failing."""
        self.backlog = spool.backlog(state_path(self.cfg, self.cfg.engine.spool))
        engine_spool = self.engine_status.get("spool", {})
        waiting = int(engine_spool.get("backlog_bytes", self.backlog.size))
        problems = []
        if engine_spool.get("shedding"):
            problems.append(f"spool full ({waiting / 2**20:.0f} MiB waiting): the engine "
                            "answers no-fill (spool_full) until shipping makes room")
        elif waiting > self.cfg.engine.spool_warn_bytes:
            problems.append(f"spool backlog {waiting / 2**20:.0f} MiB passes "
                            f"engine.spool_warn_bytes "
                            f"({self.cfg.engine.spool_warn_bytes / 2**20:.0f} MiB)")
        shipping = self.shipper.status() if self.shipper is not None else {}
        if shipping.get("failing"):
            problems.append(f"not delivered ({shipping['last_error']}); retrying")
        return "events: " + "; ".join(problems) if problems else ""

    def _watch_sync(self) -> None:
        """The sync loop only ends when the supervisor stops: one that ended otherwise (an
        unexpected error) is named in the status and started again."""
        task, stop = self.sync_task, self.stop
        if task is None or stop is None or stop.is_set():
            return
        if not task.done():
            if self.sync_problem and time.monotonic() - self.sync_restarted > SYNC_STABLE:
                self.sync_problem = ""  # running again long enough to say it recovered
            return
        exc = task.exception() if not task.cancelled() else None
        self.sync_problem = f"sync stopped: {exc!r}" if exc else "sync stopped"
        log.error("%s; starting it again", self.sync_problem, exc_info=exc)
        self.sync_task = asyncio.ensure_future(self.agent.run(stop))
        self.sync_restarted = time.monotonic()

    async def health_round(self) -> None:
        self._watch_sync()
        for component in self.components:
            if component.name == "engine" and component.runner.crashed():
                # Restarted by systemd after a failure: a damaged snapshot would make that
                # a crash loop, so the active version's files are checked first.
                await self.agent.repair_current()
            await component.health()
        active = self.store.current_version()
        self.context.snapshot_version = active or 0
        self.gaps = self.missing()
        self.checked_at = time.time()
        self.events_warning = await asyncio.to_thread(self.spool_warning)
        version = f"v{active}" if active is not None else "no snapshot"
        waited = time.monotonic() - self.started
        timed_out = waited >= self.cfg.supervisor.ready_timeout
        if not self.gaps and not self.warnings:
            self.summary = f"serving {version}" + (" (draining)" if self.draining else "")
        elif not self.gaps:
            self.summary = f"degraded ({version}): " + "; ".join(self.warnings)
        else:
            state = "degraded" if self.ready_sent or timed_out else "starting"
            self.summary = f"{state} ({version}): " + "; ".join(self.gaps + self.warnings)
        lines = [f"STATUS={self.summary}"]
        # Warnings never hold READY back: the PoP serves.
        if not self.ready_sent and (not self.gaps or timed_out):
            self.ready_sent = True
            lines.insert(0, "READY=1")
            if self.gaps:
                log.warning("ready after %.0f s, %s", waited, self.summary)
            else:
                log.info("ready: %s", self.summary)
        notify(*lines)

    async def health_loop(self, stop: asyncio.Event) -> None:
        interval = float(self.cfg.supervisor.health_interval)
        watchdog = watchdog_interval()
        if watchdog is not None:
            interval = min(interval, watchdog)
        while not stop.is_set():
            await self.health_round()
            # From this loop only: if it hangs, systemd sees the pings stop.
            notify("WATCHDOG=1")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    def status(self) -> Status:
        active = self.store.current_version()
        sync = self.agent.state
        return {
            "ready": not self.gaps, "summary": self.summary,
            "degraded": "; ".join((self.gaps if self.ready_sent else []) + self.warnings)
            or None,
            "pop": self.cfg.pop.id, "mode": self.cfg.supervisor.mode,
            "snapshot": {"version": active, "sha256": sync.sha256 if active else "",
                         "activated": sync.activated},
            "sync": sync.report(), "draining": self.draining,
            "components": {c.name: {"ok": c.last.ok, "reason": c.last.reason, **c.last.details}
                           for c in self.components},
            "tuning": self.tuning_status(),
            "events": {"ok": not self.events_warning, "reason": self.events_warning,
                       "closed_segments": self.backlog.segments,
                       "backlog_bytes": self.backlog.size,
                       "warn_bytes": self.cfg.engine.spool_warn_bytes,
                       "shedding": bool(self.engine_status.get("spool", {}).get("shedding")),
                       "shipping": self.shipper.status() if self.shipper is not None else {}},
            "pacing": {**self.engine_status.get("pacing", {}),
                       "cache": self.engine_status.get("cache", {}),
                       "problem": self.agent.allowance_problem},
            "serving_url": f"http://{self.cfg.engine.listen.split(',')[0].strip()}",
            "uptime_s": round(time.monotonic() - self.started, 1),
            "checked_at": self.checked_at,
            "health_interval": float(self.cfg.supervisor.health_interval),
        }

    def tuning_status(self) -> dict[str, Any]:
        if self.tuning is None:
            return {"enabled": False, "reason": "the supervisor leaves this host's tuning alone "
                    "(dev mode, a container, or tuning.drift_check = false)"}
        return self.tuning.status()

    # --- writes ---------------------------------------------------------------------

    async def tuning_applied(self) -> None:
        """Returns once adpop-tune.service has no start pending or running (the supervisor
        starts beside it at boot), or after TUNE_WAIT whatever its state."""
        deadline = time.monotonic() + TUNE_WAIT
        while time.monotonic() < deadline:
            values = await unit_properties(TUNE_UNIT, "ActiveState", "Job")
            # A start job waits in the queue with the unit still inactive.
            pending = values.get("Job", "").strip() not in ("", "0")
            if values.get("ActiveState") not in ("activating", "reloading") and not pending:
                return
            await asyncio.sleep(0.5)
        log.warning("%s still not finished after %.0f s; checking the tuning anyway", TUNE_UNIT,
                    TUNE_WAIT, extra={"component": "tuning"})

    async def apply_tuning(self) -> str:
        """Re-applies the tuning through adpop-tune.service, which holds the privileges."""
        code, out = await systemctl("restart", TUNE_UNIT)
        if code:
            raise OSError(f"systemctl restart {TUNE_UNIT}: {out}")
        return f"{TUNE_UNIT} re-applied the tuning"

    def sync_now(self) -> str:
        self.agent.wake.set()
        return "sync started; `adpop status` shows its outcome"

    async def rollback(self, to: int | None) -> str:
        message = await roll_back(self.store, self.admin, to)
        self.agent.adopt_current()
        return message

    async def set_draining(self, draining: bool) -> str:
        self.draining = draining
        code, body = await self.admin.call("POST", "/drain" if draining else "/undrain")
        if code != 200:
            raise OSError(f"engine refused: {body}")
        return ("draining: new connections get 503, requests in flight finish" if draining
                else "serving again")

    # --- run ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event,
                  control_api: Callable[[Supervisor], Server] | None = None) -> None:
        """Runs until `stop`. `control_api` makes the control server once the parts had
        their first health pass (the caller wires it: the server depends on this class, not
        the other way round)."""
        log.info("starting %s in %s mode, pid %d", ", ".join(c.name for c in self.components),
                 self.cfg.supervisor.mode, os.getpid())
        # Sync first: at boot the first snapshot is the longest wait, and it needs none of
        # the parts; their first health pass (systemctl calls, a cache that is still
        # starting) runs beside it.
        self.sync_task = asyncio.ensure_future(self.agent.run(stop))
        self.stop = stop
        control: Server | None = None
        tuning = None
        try:
            if self.cfg.supervisor.mode == "appliance":
                await self.reload_stale_units()  # before the first health pass starts parts
            for component in self.components:
                await component.health()  # starts what is not running
            if control_api is not None:
                control = control_api(self)
                await control.start()
            tuning = asyncio.ensure_future(self.tuning.run(stop)) if self.tuning else None
            await self.health_loop(stop)
        finally:
            notify("STOPPING=1", "STATUS=stopping")
            stop.set()
            await self.sync_task
            if tuning is not None:
                await tuning
            if control is not None:
                await control.stop()
            for component in reversed(self.components):
                await component.stop()

    async def reload_stale_units(self) -> None:
        """The parts' command lines, CPUs and memory come from the generator's drop-ins. A
        configuration edited since systemd last ran it leaves them stale: reload, so every
        part starts as the configuration now says."""
        stale = units.stale(units.drop_ins(self.cfg, cpulist.online()))
        if not stale:
            return
        code, out = await systemctl("daemon-reload")
        if code:
            log.error("the configuration changed since boot but daemon-reload failed (%s): "
                      "%s start with the old settings", out, ", ".join(stale))
        else:
            log.warning("the configuration changed since the units were generated: reloaded "
                        "systemd, so %s start with the new settings", ", ".join(stale))


def _waits_for_snapshot(store: SnapshotStore) -> str:
    # The engine has nothing to serve before a verified snapshot is active.
    return "waits for a first verified snapshot" if store.current_version() is None else ""


class EngineProcess(ChildProcess):
    """The engine as a dev-mode child, started from the `current` link once there is one."""

    def __init__(self, supervisor: Supervisor, log_path: Path, pid_path: Path | None) -> None:
        super().__init__(engine_command(supervisor.cfg), log_path, pid_path,
                         config_status=ENGINE_CONFIG_STATUS)
        self.supervisor = supervisor

    def waiting(self) -> str:
        return _waits_for_snapshot(self.supervisor.store)

    async def start(self) -> None:
        # A damaged payload would fail every start: checked, and replaced, first.
        await self.supervisor.agent.repair_current()
        if not self.waiting():
            await super().start()


class EngineUnit(SystemdUnit):
    """adpop-engine.service, started through systemd once a snapshot is active (the unit's
    ConditionPathExists holds it back until then too)."""

    def __init__(self, unit: str, store: SnapshotStore, agent: SyncAgent) -> None:
        super().__init__(unit, config_status=ENGINE_CONFIG_STATUS)
        self.store = store
        self.agent = agent

    def waiting(self) -> str:
        return _waits_for_snapshot(self.store)

    async def start(self) -> None:
        # A damaged payload would fail every start: checked, and replaced, first.
        await self.agent.repair_current()
        if not self.waiting():
            await super().start()
