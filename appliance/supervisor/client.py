"""A client of the control API: what `adpop status`, `sync-now`, `rollback`, `drain` and
`undrain` are made of."""

from __future__ import annotations

import http.client
import json
import socket
from typing import TYPE_CHECKING, Any, cast

from appliance.errors import AdpopError

if TYPE_CHECKING:  # annotations only: the schema is for type checkers and tests
    from appliance.supervisor import schema
    from appliance.supervisor.schema import Status, SyncReport

TIMEOUT = 15.0


class ControlError(AdpopError):
    """The control API could not be reached or refused the request."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("supervisor", timeout=TIMEOUT)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(self.path)
        self.sock = sock


def sync_line(sync: SyncReport) -> tuple[str, str]:
    """What sync is doing, for `adpop status` and the console: ("ok" | "warn" | "bad", text).
    An operator's rollback is a choice, shown as a pin, never as a failure."""
    if sync.get("pinned"):
        return "warn", f"pinned to v{sync['pinned']} by operator until the next publish"
    if sync.get("error"):
        return "bad", str(sync["error"])
    if sync.get("origin_problem"):
        return "bad", str(sync["origin_problem"])
    return "ok", f"v{sync.get('version', 0)} {sync.get('state', '')}".strip()


def pacing_view(pacing: dict[str, Any], now: float) -> tuple[str, str, list[str]]:
    """Fleet budgets for `adpop status` and the console: ("ok" | "warn" | "bad", one line,
    one line per budgeted campaign: allowance, spent, reserved, pass-through rate, held)."""
    cache = pacing.get("cache") or {}
    link = ""
    if cache.get("address"):
        link = (f"; cache {cache.get('shards_up', 0)} shards linked, "
                f"{cache.get('degraded_decisions', 0):,} decisions without it")
    rows = []
    for c in pacing.get("campaigns", []):
        held = f"{c.get('throttled', 0):,}/{c.get('eligible', 0):,} held"
        rows.append(f"{c.get('id', '?')}: spent {c.get('spent_micros', 0) / 1e6:,.2f} of "
                    f"{c.get('cap_micros', 0) / 1e6:,.2f} allowed, reserved "
                    f"{c.get('reserved_micros', 0) / 1e6:,.2f}, pass "
                    f"{c.get('pass_rate', 0):.0%}, {held}")
    seq = int(pacing.get("seq") or 0)
    if not seq:
        line = "no allowance from the origin yet: budgeted campaigns wait"
        return ("bad" if pacing.get("problem") else "warn",
                line + (f" ({pacing['problem']})" if pacing.get("problem") else "") + link, rows)
    left = (float(pacing.get("expires_ms", 0)) / 1000) - now
    if pacing.get("expired") or left <= 0:
        line = "allowance EXPIRED: budgeted campaigns stopped until the origin is back"
        level = "bad"
    else:
        line = f"allowance {seq}, {len(rows)} campaigns, good for {left:.0f} s"
        level = "warn" if pacing.get("problem") else "ok"
    if pacing.get("problem"):
        line += f"; {pacing['problem']}"
    return level, line + link, rows


def stale_for(status: Status, now: float) -> float:
    """Seconds the supervisor's own figures are past due: its last health round is older
    than two health intervals (0 while fresh). A hung health loop must not look live."""
    checked, interval = status.get("checked_at"), status.get("health_interval")
    if not checked or not interval:
        return 0.0
    age = now - float(checked)
    return age if age > 2 * float(interval) else 0.0


def call(path: str, method: str, route: str, body: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """One request to the supervisor at `path`; raises ControlError with its message."""
    conn = _UnixConnection(path)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, route, body=payload,
                     headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        answer: dict[str, Any] = json.loads(resp.read() or b"{}")
    except (OSError, http.client.HTTPException) as exc:
        raise ControlError(f"supervisor not reachable on {path}: {exc}",
                           hint="is it running? `systemctl status adpop-supervisor`, or "
                                "give --socket") from exc
    except json.JSONDecodeError as exc:
        raise ControlError(f"supervisor on {path} answered something other than JSON") from exc
    finally:
        conn.close()
    if resp.status >= 400:
        err = answer.get("error", {})
        raise ControlError(f"{err.get('code', resp.status)}: {err.get('message', answer)}")
    return answer


# Typed reads, one per route the CLI and the console read: what each answers is declared in
# schema.ANSWERS, and tests/test_control_schema.py holds the supervisor to it, so the casts
# below state a checked fact.

def status(path: str) -> Status:
    return cast("Status", call(path, "GET", "/v1/status"))


def snapshots(path: str) -> schema.Snapshots:
    return cast("schema.Snapshots", call(path, "GET", "/v1/snapshots"))


def tuning(path: str) -> schema.Tuning:
    return cast("schema.Tuning", call(path, "GET", "/v1/tuning"))


def xdp(path: str) -> schema.Xdp:
    return cast("schema.Xdp", call(path, "GET", "/v1/xdp"))


def events(path: str) -> schema.Events:
    return cast("schema.Events", call(path, "GET", "/v1/events"))


def logs(path: str, lines: int) -> schema.Logs:
    return cast("schema.Logs", call(path, "GET", f"/v1/logs?lines={lines}"))


def diff(path: str, version: int) -> schema.Diff:
    return cast("schema.Diff", call(path, "GET", f"/v1/snapshots/diff?version={version}"))


def cache(path: str) -> schema.Cache:
    return cast("schema.Cache", call(path, "GET", "/v1/cache"))


def write(path: str, route: str, body: dict[str, Any] | None = None) -> schema.WriteResult:
    """A POST to one of the write routes; raises ControlError with the supervisor's message."""
    return cast("schema.WriteResult", call(path, "POST", route, body))
