"""`adpop up`: an origin and a whole PoP on this machine, under one state directory.

It starts the origin with the sample campaigns and publishes version 1, then the supervisor in
dev mode (which runs redis-server and the engine as its children), waits until the PoP serves,
prints how to use it and writes the same to <state>/up.json. Ctrl-C or SIGTERM stops every
process it started.

It keeps them running as systemd would: an origin or a supervisor that dies is started again
(with backoff), and the engine and the cache outlive a supervisor that dies, so the PoP keeps
serving while the next supervisor adopts them. `adpop up` is their subreaper: a part orphaned
by a dead supervisor is reaped here, not left a zombie.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from appliance.errors import AdpopError
from appliance.supervisor.client import ControlError, call
from appliance.supervisor.components import proc_stat

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CAMPAIGNS = REPO / "config" / "campaigns"
READY_WAIT = 120.0
STOP_WAIT = 15.0
RESTART_FIRST, RESTART_MAX = 1.0, 30.0  # backoff between restarts of a process that died
STABLE_AFTER = 60.0  # running this long and the backoff starts over
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
ENROLL_TOKEN = "enroll-token"  # under the PoP's state folder
OPERATOR_TOKEN = "operator-token"  # under the state folder: an admin's, for the demo


class UpError(AdpopError):
    """The local PoP could not be brought up."""


def _engine_binary() -> str:
    for candidate in (os.environ.get("ADPOP_ENGINE", ""), str(REPO / "engine/build/adpop-engine"),
                      "/usr/lib/adpop/adpop-engine"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise UpError("no engine binary found", hint="`make setup` builds engine/build/adpop-engine")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before in this process: a port is only
    bound later, by the server it is for, so two calls in a row may otherwise both get it."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _check_port(port: int, flag: str = "--port") -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UpError(f"{flag} {port}: the port on 127.0.0.1 is taken ({exc.strerror})",
                          hint=f"stop what uses it, or give another `adpop up {flag} N`"
                          ) from exc


def _command_name() -> str:
    """How the user types `adpop`: the bare name when it is on PATH, else the venv's path
    (`make demo` does not activate the venv)."""
    if shutil.which("adpop"):
        return "adpop"
    entry = Path(sys.executable).parent / "adpop"
    try:
        return str(entry.relative_to(Path.cwd()))
    except ValueError:
        return str(entry)


def _adpop(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", *args]


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
    if result.returncode:
        raise UpError(f"{what} failed: {(result.stderr or result.stdout).strip()}")


def _write_private(path: Path, text: str) -> None:
    """A file only its owner reads (the push token; the configurations name their files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # a file left by an older `adpop up` was 0644
        out.write(text)


def _write_configs(state: Path, port: int, chosen: Mapping[str, int] | None = None,
                   origin_hosts: Sequence[str] = ()) -> tuple[Path, Path, dict[str, Any]]:
    """`chosen`: ports the operator fixed ("origin", "push", "cache"); the rest are free.
    `origin_hosts`: names the origin's TLS certificate is for besides the loopback ones."""
    hosts = json.dumps(["127.0.0.1", "localhost", *origin_hosts])
    chosen = chosen or {}
    _handed_out.update({port, *chosen.values()})  # checked free by the caller
    origin_port, push_port, cache_port = (chosen.get(name) or free_port()
                                          for name in ("origin", "push", "cache"))
    metrics_port = free_port()
    origin_toml, pop_toml = state / "origin.toml", state / "appliance.toml"
    _write_private(origin_toml, f"""# written by `adpop up`
[origin]
listen = "127.0.0.1:{origin_port}"
state_dir = "{state / 'origin'}"
tls = "private-ca"
tls_hosts = {hosts}

[rollout]
stage_timeout = "1m"
""")
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    _write_private(pop_toml, f"""# written by `adpop up`
[pop]
id = "pop-local"

[paths]
state_dir = "{state / 'pop'}"

[sync]
origin_url = "https://127.0.0.1:{origin_port}"
push_listen = "127.0.0.1:{push_port}"
enrollment_token_file = "{ENROLL_TOKEN}"
poll_interval = "5s"
health_window = "2s"

[engine]
binary = "{_engine_binary()}"
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{metrics_port}"
admin_socket = "engine.sock"

[cache]
address = "127.0.0.1:{cache_port}"
binary = "{redis}"

[supervisor]
mode = "dev"
control_socket = "control.sock"
operator_group = ""
ready_timeout = "1m"
""")
    ports = {"origin": origin_port, "push": push_port, "cache": cache_port, "engine": port,
             "metrics": metrics_port}
    return origin_toml, pop_toml, ports


def prepare(state: Path, campaigns: Path, port: int, chosen: Mapping[str, int] | None = None,
            origin_hosts: Sequence[str] = ()) -> tuple[Path, Path, dict[str, Any]]:
    """Writes both configurations under `state`, makes the origin's TUF repository and has
    the PoP trust its root, imports `campaigns` and publishes version 1 (once). Returns the
    origin's and the PoP's configuration files and the ports they use."""
    (state / "logs").mkdir(parents=True, exist_ok=True)
    origin_toml, pop_toml, ports = _write_configs(state, port, chosen, origin_hosts)
    _run(_adpop("origin", "keys", "init", "--config", str(origin_toml)), "origin keys init")
    _run(_adpop("pop", "trust", str(root_json(state / "origin")), "--config", str(pop_toml)),
         "pop trust")
    if not (state / OPERATOR_TOKEN).exists():
        # An admin token for the remote form of every `adpop origin` command
        # (--origin URL --token-file FILE). A token lost with its file is replaced.
        subprocess.run(_adpop("origin", "tokens", "revoke", "operator", "--config",
                              str(origin_toml)), capture_output=True, check=False, cwd=REPO)
        _run(_adpop("origin", "tokens", "create", "operator", "--role", "admin", "--out",
                    str(state / OPERATOR_TOKEN), "--config", str(origin_toml)),
             "origin tokens create")
    if not (state / "pop" / "identity" / "pop.pem").exists():
        # The PoP enrolls itself at its first start with a token made here, as a flashed
        # PoP does with the one `adpop flash` put in: nothing to configure by hand.
        _run(_adpop("origin", "pops", "enroll", "pop-local", "--ttl", "1h", "--out",
                    str(state / "pop" / ENROLL_TOKEN), "--config", str(origin_toml)),
             "origin pops enroll")
    _run(_adpop("origin", "campaigns", "import", str(campaigns), "--config", str(origin_toml)),
         "campaign import")
    if not list((state / "origin" / "payloads").glob("*.capnp")):
        _run(_adpop("origin", "publish", "--config", str(origin_toml)), "publish")
    return origin_toml, pop_toml, ports


def root_json(origin_state: Path) -> Path:
    """The origin's TUF root: what its PoPs are given to trust."""
    return origin_state / "tuf" / "metadata" / "root.json"


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def up(state: Path, campaigns: Path | None, port: int,
       chosen: Mapping[str, int] | None = None) -> int:
    """Runs until a signal; returns the exit status. `chosen`: the origin's, push and cache
    ports the operator fixed (the others are picked free)."""
    state = state.resolve()
    campaigns = (campaigns or SAMPLE_CAMPAIGNS).resolve()
    if not campaigns.is_dir():
        raise UpError(f"campaign folder {campaigns} does not exist",
                      hint="give --campaigns DIR with .toml or .json campaign files")
    chosen = {name: value for name, value in (chosen or {}).items() if value}
    flags = {"engine": "--port", **{name: f"--{name}-port" for name in chosen}}
    wanted = {"engine": port, **chosen}
    for name, value in wanted.items():
        clash = [other for other, v in wanted.items() if v == value and other != name]
        if clash:
            raise UpError(f"{flags[name]} {value} is also {flags[clash[0]]}",
                          hint="give each part its own port")
        _check_port(value, flags[name])
    started = time.monotonic()
    origin_toml, pop_toml, ports = prepare(state, campaigns, port, chosen)

    argvs = {"origin": _adpop("origin", "serve", "--config", str(origin_toml)),
             "supervisor": _adpop("supervisor", "--keep-parts", "--config", str(pop_toml))}
    keeper = _Keeper(state, argvs)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    control = str(state / "pop" / "control.sock")
    try:
        for name in argvs:
            keeper.start(name)
        status = _wait_ready(keeper.children, control, state)
        info = {
            "serving_url": f"http://127.0.0.1:{port}",
            "example": (f"curl -s 'http://127.0.0.1:{port}/v1/decide?id=r1"
                        "&placement=article-inline&country=US&device=desktop'"),
            "control_socket": control,
            "status": f"{_command_name()} status --socket {control}",
            "console": f"{_command_name()} console --socket {control}",
            "origin_url": f"https://127.0.0.1:{ports['origin']}",
            "ports": ports,
            "pids": {"origin": keeper.children["origin"].pid,
                     "supervisor": keeper.children["supervisor"].pid,
                     **{name: comp.get("pid") for name, comp in status["components"].items()}},
            "snapshot_version": status["snapshot"]["version"],
        }
        (state / "up.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"adpop PoP serving v{info['snapshot_version']} at {info['serving_url']} "
              f"(up in {time.monotonic() - started:.1f} s)\n"
              f"  try:     {info['example']}\n"
              f"  status:  {info['status']}\n"
              f"  console: {info['console']}\n"
              f"  origin:  {info['origin_url']}  (adpop origin ... --config {origin_toml}, "
              f"or from anywhere: --origin {info['origin_url']} --token-file "
              f"{state / OPERATOR_TOKEN})\n"
              f"  logs:    {state / 'logs'}/   details: {state / 'up.json'}\n"
              "Ctrl-C stops everything.", flush=True)
        while True:
            restarted = keeper.tend()
            if restarted:
                info["pids"].update({name: keeper.children[name].pid for name in restarted})
                (state / "up.json").write_text(json.dumps(info, indent=2) + "\n")
            time.sleep(0.5)
    except _Stop:
        print("stopping", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        keeper.stop_all()


def _child_setup() -> None:
    # The origin and the supervisor stop (cleanly: SIGTERM) when `adpop up` dies, even by
    # SIGKILL; the supervisor then stops the parts it runs.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _Keeper:
    """The origin and the supervisor as `adpop up`'s children, each restarted with backoff
    when it dies; orphaned parts are reaped here."""

    def __init__(self, state: Path, argvs: dict[str, list[str]]) -> None:
        self.state = state
        self.argvs = argvs
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self.backoff = dict.fromkeys(argvs, RESTART_FIRST)
        self.next_start: dict[str, float] = {}
        # Parts a dead supervisor leaves behind become this process's children, not init's.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)

    def start(self, name: str) -> None:
        with open(self.state / "logs" / f"{name}.log", "ab") as out:
            self.children[name] = subprocess.Popen(
                self.argvs[name], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=REPO,
                preexec_fn=_child_setup)  # noqa: PLW1509 - `adpop up` runs no threads
        self.started[name] = time.monotonic()

    def tend(self) -> list[str]:
        """Reaps orphans and restarts what died once its backoff passed; returns the names
        started again."""
        self._reap_orphans()
        restarted = []
        now = time.monotonic()
        for name, child in self.children.items():
            if child.poll() is None:
                continue
            if name not in self.next_start:
                if now - self.started[name] >= STABLE_AFTER:
                    self.backoff[name] = RESTART_FIRST
                self.next_start[name] = now + self.backoff[name]
                print(f"the {name} exited with status {child.returncode}; restarting it in "
                      f"{self.backoff[name]:.0f} s (see {self.state / 'logs' / name}.log)"
                      + ("; the engine keeps serving" if name == "supervisor" else ""),
                      flush=True)
                self.backoff[name] = min(RESTART_MAX, self.backoff[name] * 2)
            elif now >= self.next_start[name]:
                del self.next_start[name]
                self.start(name)
                restarted.append(name)
        return restarted

    def _reap_orphans(self) -> None:
        ours = {child.pid for child in self.children.values()}
        while True:
            try:
                # WNOWAIT: look first; the origin's and supervisor's own status is left for
                # Popen.poll to collect.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in ours:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)

    def stop_all(self) -> None:
        _stop_all(self.children)
        # A supervisor that was dead at this moment could not stop the parts it ran: they
        # are this process's children now (subreaper), and only those are signalled.
        left = []
        for pid_file in (self.state / "pop" / "run").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError):
                pid = int(json.loads(pid_file.read_text())["pid"])
                if int(proc_stat(pid)[1]) == os.getpid():
                    os.kill(pid, signal.SIGTERM)
                    left.append(pid)
            pid_file.unlink(missing_ok=True)
        for pid in left:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                _wait_pid(pid, STOP_WAIT)


def _wait_pid(pid: int, timeout: float) -> None:
    """Reaps child `pid`, killing it when it is still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _wait_ready(children: dict[str, subprocess.Popen[bytes]], control: str,
                state: Path) -> dict[str, Any]:
    deadline = time.monotonic() + READY_WAIT
    last = "the supervisor has not answered yet"
    while time.monotonic() < deadline:
        for name, child in children.items():
            if child.poll() is not None:
                tail = (state / "logs" / f"{name}.log").read_text(errors="replace")[-600:]
                raise UpError(f"the {name} exited with status {child.returncode} while "
                              f"starting: ...{tail.strip()}")
        try:
            status = call(control, "GET", "/v1/status")
        except ControlError:
            time.sleep(0.2)
            continue
        if status["ready"]:
            return status
        last = status["summary"]
        time.sleep(0.2)
    raise UpError(f"the PoP is not serving after {READY_WAIT:.0f} s: {last}",
                  hint=f"see the logs in {state / 'logs'}")


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    # The supervisor first: it stops the engine and the cache it runs.
    for name in ("supervisor", "origin"):
        child = children.get(name)
        if child is None or child.poll() is not None:
            continue
        child.terminate()
        try:
            child.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
