"""The parts the supervisor keeps running, behind one interface.

A Component has a runner (how it is started and stopped) and a probe (how healthy it is).
In dev mode the runner is a child process of the supervisor; in appliance mode it is the
part's own systemd unit, started and restarted through systemctl. Either way the supervisor
restarts a part that stopped, with exponential backoff, and reports why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.errors import AdpopError

log = logging.getLogger("adpop.supervisor")

STOP_GRACE = 10.0  # seconds a part gets to exit after SIGTERM before SIGKILL
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
STABLE_AFTER = 60.0  # healthy this long and the backoff starts over


class ComponentError(AdpopError):
    """A part could not be started or stopped."""


@dataclass(frozen=True)
class Health:
    """One look at a part: ok, and when not (or when worth saying) why."""

    ok: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """How a part is run: a child process (dev) or a systemd unit (appliance)."""

    description: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def refresh(self) -> None:
        """Reads the part's state; running() and pid() answer from it."""
    def running(self) -> bool: ...
    def pid(self) -> int | None: ...
    def stopped_why(self) -> str:
        """How the part last ended, when known ("" otherwise)."""
    def waiting(self) -> str:
        """Why the part is not to run yet ("" when it may): not a failure, nothing to retry."""
    def crashed(self) -> bool:
        """Whether the part failed and was restarted by someone else (systemd) since the
        last call."""
    def config_error(self) -> str:
        """Why the part refused its configuration, when it last exited for that ("" else):
        restarting it would only fail again."""


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a dev-mode child is killed when the supervisor dies, even by
    # SIGKILL, so no engine or cache outlives it.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first, then the parent's pid,
    ...); [] when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead and not yet reaped, does not)."""
    stat = proc_stat(pid)
    return bool(stat) and stat[0] != "Z"


def started_at(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 when it is gone): with the pid,
    it names one process, whatever pid reuse happens later."""
    stat = proc_stat(pid)
    return int(stat[19]) if stat else 0


class ChildProcess:
    """A part run as the supervisor's own child, its output appended to a log file.

    With a `pid_path` the part outlives the supervisor: its pid is recorded there, and the
    next supervisor adopts it when it still runs with the same command line (what `adpop up`
    relies on to restart a supervisor while the engine keeps serving). Without one, the part
    dies with the supervisor."""

    def __init__(self, argv: Sequence[str], log_path: Path, pid_path: Path | None = None,
                 config_status: int | None = None) -> None:
        """`config_status`: the exit status the part uses for a configuration it refuses."""
        self.argv = list(argv)
        self.config_status = config_status
        self.log_path = log_path
        self.pid_path = pid_path
        self.description = f"child process {Path(self.argv[0]).name}"
        self.process: asyncio.subprocess.Process | None = None
        self.adopted: int | None = None  # a part a previous supervisor started

    async def start(self) -> None:
        if self.pid_path is not None and await self._adopt():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    preexec_fn=None if self.pid_path else _die_with_parent)
            except OSError as exc:
                raise ComponentError(f"cannot start {self.argv[0]}: {exc.strerror}",
                                     hint="check the binary path in the configuration") from exc
        if self.pid_path is not None:
            # The command line is kept here, not read from /proc: redis-server rewrites its
            # own process title.
            pid = self.process.pid
            self.pid_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.pid_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": pid, "started": started_at(pid),
                                       "argv": self.argv}) + "\n")
            os.replace(tmp, self.pid_path)

    async def _adopt(self) -> bool:
        """Takes over the part a previous supervisor left running; one started with another
        command line (the settings changed) is stopped, to start as configured now."""
        try:
            record = json.loads(self.pid_path.read_text()) if self.pid_path else {}
            pid, started, argv = int(record["pid"]), int(record["started"]), record["argv"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not alive(pid) or started_at(pid) != started:
            return False  # gone, or its pid now names another process
        name = Path(self.argv[0]).name
        self.adopted = pid
        if argv == self.argv:
            log.info("adopted %s, pid %d, left running by the previous supervisor", name, pid)
            return True
        log.warning("stopping %s pid %d: it runs with other settings than configured now",
                    name, pid)
        await self.stop()
        return False

    async def stop(self) -> None:
        process, self.process = self.process, None
        adopted, self.adopted = self.adopted, None
        if self.pid_path is not None and (process or adopted):
            # Only what this supervisor ran or adopted: a restart of a part that is not
            # running yet must still find the record of the one to adopt.
            self.pid_path.unlink(missing_ok=True)
        if adopted is not None and alive(adopted):
            # Not our child: signalled and polled, as nothing here can wait() for it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(adopted, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            while alive(adopted) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if alive(adopted):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(adopted, signal.SIGKILL)
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def refresh(self) -> None:
        pass  # the event loop reaps the child; returncode is always current

    def running(self) -> bool:
        if self.adopted is not None:
            return alive(self.adopted)
        return self.process is not None and self.process.returncode is None

    def pid(self) -> int | None:
        if self.adopted is not None:
            return self.adopted if alive(self.adopted) else None
        return self.process.pid if self.running() and self.process else None

    def stopped_why(self) -> str:
        if self.process is None or self.process.returncode is None:
            return ""
        code = self.process.returncode
        return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def waiting(self) -> str:
        return ""

    def crashed(self) -> bool:
        return False  # a child that exits is restarted through Component.health

    def config_error(self) -> str:
        if self.process is None or self.process.returncode is None or \
                self.process.returncode != self.config_status:
            return ""
        return last_line(self.log_path) or f"exited with status {self.config_status}"


async def systemctl(*args: str) -> tuple[int, str]:
    """systemctl's exit code and its output, stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        "systemctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode(errors="replace").strip()


def last_line(path: Path) -> str:
    """The last non-empty line of a log file ("" when there is none)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 4096))
            lines = fh.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


async def last_journal_line(unit: str) -> str:
    """The unit's last journal line ("" when journalctl has none)."""
    process = await asyncio.create_subprocess_exec(
        "journalctl", "-u", unit, "-n", "1", "-o", "cat", "--no-pager",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await process.communicate()
    return out.decode(errors="replace").strip() if process.returncode == 0 else ""


async def unit_properties(unit: str, *names: str) -> dict[str, str]:
    """`systemctl show` of the named properties, as a dict (a property with no value may be
    missing)."""
    args = [arg for name in names for arg in ("-p", name)]
    _, out = await systemctl("show", unit, *args)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class SystemdUnit:
    """A part run as its own systemd unit; the supervisor asks systemctl."""

    def __init__(self, unit: str, config_status: int | None = None) -> None:
        self.unit = unit
        self.config_status = config_status
        self._config_error = ""
        self.description = f"unit {unit}"
        self._active = False
        self._pid: int | None = None
        self._restarts = 0  # systemd's own restarts after failures (Restart=on-failure)
        self._restarts_seen: int | None = None

    async def start(self) -> None:
        code, out = await systemctl("start", "--no-block", self.unit)
        if code:
            raise ComponentError(f"systemctl start {self.unit} failed: {out}",
                                 hint=f"journalctl -u {self.unit}")

    async def stop(self) -> None:
        await systemctl("stop", self.unit)

    async def refresh(self) -> None:
        values = await unit_properties(self.unit, "ActiveState", "MainPID", "NRestarts",
                                       "ExecMainStatus")
        self._active = values.get("ActiveState") in ("active", "activating", "reloading")
        pid = int(values.get("MainPID", "0") or 0)
        self._pid = pid or None
        self._restarts = int(values.get("NRestarts", "0") or 0)
        if self._restarts_seen is None:
            self._restarts_seen = self._restarts
        status = int(values.get("ExecMainStatus", "0") or 0)
        self._config_error = ""
        if not self._active and self.config_status is not None and status == self.config_status:
            # RestartPreventExitStatus= in the unit: systemd does not restart it either.
            line = await last_journal_line(self.unit)
            self._config_error = line or f"exited with status {status}"

    def running(self) -> bool:
        return self._active

    def pid(self) -> int | None:
        return self._pid

    def stopped_why(self) -> str:
        return ""  # journalctl -u has it

    def waiting(self) -> str:
        return ""  # the unit's own conditions decide

    def crashed(self) -> bool:
        crashed = self._restarts_seen is not None and self._restarts > self._restarts_seen
        self._restarts_seen = self._restarts
        return crashed

    def config_error(self) -> str:
        return self._config_error


class TaskRunner:
    """A part run as a task on the supervisor's own event loop (the shipper): it lives and
    dies with the supervisor, and is restarted like any other part when it ends."""

    def __init__(self, name: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        self.main = main
        self.description = f"task {name}"
        self.task: asyncio.Future[None] | None = None
        self.stopping: asyncio.Event | None = None
        self._why = ""

    async def start(self) -> None:
        self.stopping = asyncio.Event()
        self.task = asyncio.ensure_future(self.main(self.stopping))

    async def stop(self) -> None:
        if self.task is None or self.stopping is None:
            return
        self.stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), STOP_GRACE)
        except TimeoutError:
            self.task.cancel()
        except Exception as exc:  # noqa: BLE001 - how it ended is reported, not raised here
            self._why = repr(exc)
        self.task = None

    async def refresh(self) -> None:
        if self.task is not None and self.task.done() and not self.task.cancelled():
            exc = self.task.exception()
            self._why = f"ended: {exc!r}" if exc else "ended"
            if exc is not None:
                log.error("%s %s", self.description, self._why, exc_info=exc)

    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def pid(self) -> int | None:
        return os.getpid()

    def stopped_why(self) -> str:
        return self._why

    def waiting(self) -> str:
        return ""

    def crashed(self) -> bool:
        return False

    def config_error(self) -> str:
        return ""


Probe = Callable[[], Awaitable[Health]]


class Component:
    """A part with its runner and probe: started, watched, restarted with backoff."""

    def __init__(self, name: str, runner: Runner, probe: Probe,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.runner = runner
        self.probe = probe
        self.clock = clock
        self.started = False
        self.restarts = 0
        self.backoff = BACKOFF_FIRST
        self.next_start = 0.0
        self.healthy_since: float | None = None
        self.last = Health(False, "not started")

    async def start(self) -> None:
        log.info("starting %s (%s)", self.name, self.runner.description,
                 extra={"component": self.name})
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()

    async def restart(self) -> None:
        await self.runner.stop()
        await self.start()

    async def health(self) -> Health:
        """Probes the part; a part that stopped is restarted once its backoff has passed."""
        await self.runner.refresh()
        now = self.clock()
        waiting = self.runner.waiting()
        if waiting and not self.runner.running():
            # Not a failure: the part has nothing to run on yet (no backoff, no count).
            self.last = Health(False, f"{self.name} {waiting}", {"restarts": self.restarts})
            return self.last
        if not self.runner.running():
            refused = self.runner.config_error()
            if refused:
                # Restarting would fail the same way: said once, kept until the operator
                # fixes the configuration and restarts the supervisor.
                reason = (f"{self.name} refuses its configuration: {refused}; fix the "
                          "configuration, then restart the supervisor")
                if reason != self.last.reason:
                    log.error("%s", reason, extra={"component": self.name})
                self.last = Health(False, reason, {"restarts": self.restarts})
                return self.last
            why = self.runner.stopped_why()
            reason = f"{self.name} is not running" + (f" ({why})" if why else "")
            self.healthy_since = None
            if now >= self.next_start:
                # The first start is not a restart: no warning, no count, no backoff.
                if self.started and (self.last.ok or self.restarts == 0):
                    log.warning("%s; restarting it", reason, extra={"component": self.name})
                try:
                    await self.restart()
                except ComponentError as exc:
                    reason = exc.line()
                if self.started:
                    self.restarts += 1
                    self.next_start = now + self.backoff
                    self.backoff = min(BACKOFF_MAX, self.backoff * 2)
                self.started = True
            else:
                reason += f"; next start in {self.next_start - now:.1f} s"
            self.last = Health(False, reason, {"restarts": self.restarts})
            return self.last
        health = await self.probe()
        details = {"restarts": self.restarts, "pid": self.runner.pid(), **health.details}
        if health.ok:
            self.healthy_since = self.healthy_since or now
            if now - self.healthy_since >= STABLE_AFTER:
                self.backoff = BACKOFF_FIRST
        else:
            self.healthy_since = None
        if health.ok != self.last.ok or (not health.ok and health.reason != self.last.reason):
            level = logging.INFO if health.ok else logging.WARNING
            log.log(level, "%s %s%s", self.name, "healthy" if health.ok else "unhealthy",
                    f": {health.reason}" if health.reason else "", extra={"component": self.name})
        self.last = Health(health.ok, health.reason, details)
        return self.last

