"""Collection: one round of reads from the control API, made in a worker thread, never on the
UI thread. A round that cannot reach the supervisor says so instead of raising."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from appliance.supervisor.client import ControlError, call

LOG_LINES = 500


@dataclass
class Round:
    """What one collection round saw."""

    at: float
    ok: bool
    error: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    snapshots: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    xdp: dict[str, Any] = field(default_factory=dict)
    events: dict[str, Any] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)


def collect(socket_path: str) -> Round:
    try:
        return Round(
            at=time.time(), ok=True,
            status=call(socket_path, "GET", "/v1/status"),
            snapshots=call(socket_path, "GET", "/v1/snapshots"),
            tuning=call(socket_path, "GET", "/v1/tuning"),
            xdp=call(socket_path, "GET", "/v1/xdp"),
            events=call(socket_path, "GET", "/v1/events"),
            logs=call(socket_path, "GET", f"/v1/logs?lines={LOG_LINES}")["lines"])
    except ControlError as exc:
        return Round(at=time.time(), ok=False, error=exc.message)


def write(socket_path: str, route: str, body: dict[str, Any] | None = None) -> str:
    """A write; its message, or raises ControlError with the supervisor's."""
    answer = call(socket_path, "POST", route, body)
    return str(answer.get("message", "done"))
