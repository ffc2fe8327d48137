"""Drift: the supervisor re-verifies the tuning every tuning.drift_interval and soon after a
kernel uevent for a NIC or a PCI device (a NIC that comes back has its IRQs reset), counts
drift per knob, and repairs it at a bounded rate.

Repair goes through `repair`, in the appliance a restart of adpop-tune.service, so the
supervisor itself never writes /proc or /sys. Events come straight from the kernel's netlink
socket (pyudev, source "kernel"): no udevd is needed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyudev

from appliance.config import ApplianceConfig
from appliance.errors import AdpopError
from appliance.tuning import plan
from appliance.tuning.host import Host

log = logging.getLogger("adpop.supervisor.tuning")

SETTLE = 1.0  # seconds after a uevent before checking: a NIC's queues appear one by one
HOUR = 3600.0
EVENT_SUBSYSTEMS = ("net", "pci")


class DriftWatcher:
    def __init__(self, appliance: ApplianceConfig, repair: Callable[[], Awaitable[str]],
                 host: Host | None = None, clock: Callable[[], float] = time.monotonic,
                 applied: Callable[[], Awaitable[None]] | None = None) -> None:
        self.cfg = appliance
        self.repair = repair
        # Returns once the boot's own tuning has run: before that, every knob would read as
        # drift and the first check would "repair" a tuning still being applied.
        self.applied = applied
        self.host = host or Host()
        self.clock = clock
        self.wake = asyncio.Event()
        self.drift: collections.Counter[str] = collections.Counter()  # checks that found it
        self.drifting: list[str] = []  # drifted at the last check
        self.repairs: collections.deque[float] = collections.deque()  # times, last hour
        self.repaired = self.skipped = self.checks = self.udev_events = 0
        self.last_check = 0.0
        self.last_reason = ""
        self.error = ""
        self.irqbalance = False

    # --- one check --------------------------------------------------------------------

    def _verify(self) -> tuple[list[str], bool]:
        _, table = plan.report(self.cfg, self.host)
        return [r["name"] for r in plan.not_as_desired(table)], self.host.irqbalance_running()

    async def check(self, reason: str) -> list[str]:
        """Verifies every knob, counts what drifted and repairs it if the budget allows."""
        self.checks += 1
        self.last_check, self.last_reason = time.time(), reason
        try:
            drifted, self.irqbalance = await asyncio.to_thread(self._verify)
        except (AdpopError, OSError) as exc:
            self.error = exc.line() if isinstance(exc, AdpopError) else str(exc)
            log.error("tuning check failed: %s", self.error, extra={"component": "tuning"})
            return []
        self.error = ""
        self.drift.update(drifted)
        self.drifting = drifted
        if drifted:
            await self._repair(drifted, reason)
        return drifted

    async def _repair(self, drifted: list[str], reason: str) -> None:
        now = self.clock()
        while self.repairs and now - self.repairs[0] > HOUR:
            self.repairs.popleft()
        shown = ", ".join(drifted[:5]) + (f" and {len(drifted) - 5} more" if len(drifted) > 5
                                           else "")
        if len(self.repairs) >= self.cfg.tuning.repairs_per_hour:
            self.skipped += 1
            log.warning("tuning drift (%s) after %s; %d repairs in the last hour, so not "
                        "repaired", shown, reason, len(self.repairs),
                        extra={"component": "tuning"})
            return
        self.repairs.append(now)
        self.repaired += 1
        log.warning("tuning drift (%s) after %s; repairing", shown, reason,
                    extra={"component": "tuning"})
        try:
            log.info("repair: %s", await self.repair(), extra={"component": "tuning"})
        except (AdpopError, OSError) as exc:
            self.error = f"repair failed: {exc}"
            log.error("%s", self.error, extra={"component": "tuning"})

    # --- the loop -----------------------------------------------------------------------

    def _monitor(self) -> pyudev.Monitor:
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        for subsystem in EVENT_SUBSYSTEMS:
            monitor.filter_by(subsystem)
        monitor.start()
        return monitor

    def _on_events(self, monitor: pyudev.Monitor) -> None:
        while (device := monitor.poll(timeout=0)) is not None:
            self.udev_events += 1
            log.debug("uevent %s %s", device.action, device.sys_path,
                      extra={"component": "tuning"})
            self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        monitor = self._monitor()
        loop.add_reader(monitor.fileno(), self._on_events, monitor)
        try:
            reason = "start"
            if self.applied is not None:
                self.last_reason = "waiting for the boot's tuning"
                waiting = asyncio.ensure_future(self.applied())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
                for task in (waiting, stopping):
                    task.cancel()
            while not stop.is_set():
                await self.check(reason)
                waiters = [asyncio.ensure_future(self.wake.wait()),
                           asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waiters, timeout=self.cfg.tuning.drift_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                reason = "interval"
                if self.wake.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), SETTLE)  # let the device settle
                    self.wake.clear()
                    reason = "device event"
        finally:
            loop.remove_reader(monitor.fileno())

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "checks": self.checks, "last_check": self.last_check,
                "last_reason": self.last_reason, "drifting": self.drifting,
                "drift": dict(self.drift), "repairs": self.repaired,
                "repairs_skipped": self.skipped, "udev_events": self.udev_events,
                "irqbalance": ("running; banned from the shard CPUs and our IRQs"
                               if self.irqbalance else "not running"),
                "error": self.error}
