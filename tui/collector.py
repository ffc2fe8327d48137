"""Collection: one round of reads from the control API, made in a worker thread, never on the
UI thread. A round that cannot reach the supervisor says so instead of raising."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from appliance.supervisor import client
from appliance.supervisor.client import ControlError

if TYPE_CHECKING:  # annotations only: the schema is for type checkers and tests
    from appliance.supervisor.schema import Events, LogLine, Snapshots, Status, Tuning, Xdp

LOG_LINES = 500


@dataclass
class Round:
    """What one collection round saw."""

    at: float
    ok: bool
    error: str = ""
    # A round that failed holds empty answers (the console shows its error, not them), so
    # each field keeps its one type from the schema.
    status: Status = field(default_factory=lambda: cast("Status", {}))
    snapshots: Snapshots = field(default_factory=lambda: cast("Snapshots", {}))
    tuning: Tuning = field(default_factory=lambda: cast("Tuning", {}))
    xdp: Xdp = field(default_factory=lambda: cast("Xdp", {}))
    events: Events = field(default_factory=lambda: cast("Events", {}))
    logs: list[LogLine] = field(default_factory=list)


def collect(socket_path: str) -> Round:
    try:
        return Round(
            at=time.time(), ok=True,
            status=client.status(socket_path),
            snapshots=client.snapshots(socket_path),
            tuning=client.tuning(socket_path),
            xdp=client.xdp(socket_path),
            events=client.events(socket_path),
            logs=client.logs(socket_path, LOG_LINES)["lines"])
    except ControlError as exc:
        return Round(at=time.time(), ok=False, error=exc.message)


def write(socket_path: str, route: str, body: dict[str, Any] | None = None) -> str:
    """A write; its message, or raises ControlError with the supervisor's."""
    return client.write(socket_path, route, body).get("message") or "done"
