"""The control API's answers, typed once: the supervisor sends them, the client and the console
read them, and the console tests' fake serves them. `conforms` checks a decoded JSON answer
against its type (no key missing that is required, none unknown), so a test can hold the real
supervisor and the fake to the same definitions (tests/test_control_schema.py).

Keys marked NotRequired are the ones the supervisor leaves out in some states (a part not
started has no pid) or that the console does without.
"""

# No `from __future__ import annotations` here: TypedDict reads NotRequired[...] at class
# creation, which string annotations hide from it on Python 3.11.
import types
from typing import Any, NotRequired, TypedDict, Union, get_args, get_origin, get_type_hints


class ErrorBody(TypedDict):
    code: str
    message: str


class Error(TypedDict):
    """Every 4xx and 5xx answer."""

    error: ErrorBody


class WriteResult(TypedDict):
    ok: bool
    message: str
    drifting: NotRequired[list[str]]  # /v1/tuning/apply: what still drifts


class LogLine(TypedDict):
    time: float
    level: str
    component: str
    message: str


class Logs(TypedDict):
    lines: list[LogLine]


class SnapshotRow(TypedDict):
    version: int
    sha256: str
    bytes: int
    created: float
    campaigns: int
    activated: float | None
    active: bool
    state: str


class Snapshots(TypedDict):
    active: int | None
    snapshots: list[SnapshotRow]


# "from" is a keyword: the functional form.
Diff = TypedDict("Diff", {"from": int, "to": int, "added": list[str], "removed": list[str],
                          "changed": list[str]})


class Events(TypedDict):
    closed_segments: int
    backlog_bytes: int
    engine: NotRequired[dict[str, Any]]
    spool: NotRequired[dict[str, Any]]
    warn_bytes: NotRequired[int]
    shedding: NotRequired[bool]
    shipping: NotRequired[dict[str, Any]]  # appliance/events/shipper.py, Shipper.status


class Cache(TypedDict):
    address: str
    ok: bool
    reason: str
    restarts: NotRequired[int]
    pid: NotRequired[int | None]
    ping_ms: NotRequired[float]
    used_memory: NotRequired[int]
    max_memory: NotRequired[int]
    evicted_keys: NotRequired[int]
    connected_clients: NotRequired[int]


class Knob(TypedDict):
    name: str
    group: str
    current: str | None  # None: the host has no such knob (or it cannot be read)
    desired: str
    status: str
    why: str
    path: NotRequired[str]  # the file it lives in, when it is one


class Tuning(TypedDict):
    status: dict[str, Any]
    knobs: list[Knob]
    shard_cpus: NotRequired[list[int]]
    housekeeping_cpus: NotRequired[list[int]]
    error: NotRequired[str]


class Xdp(TypedDict):
    loaded: bool
    pin_dir: str
    attached: dict[str, Any]
    reason: NotRequired[str]
    blocklist: NotRequired[dict[str, int]]
    counters: NotRequired[dict[str, dict[str, int]]]
    top: NotRequired[list[dict[str, Any]]]
    rate_pps: NotRequired[int]
    burst: NotRequired[int]


class SnapshotInfo(TypedDict):
    version: int | None
    sha256: str
    activated: float


class SyncReport(TypedDict):
    """What sync reports: to the origin (POST /status) and in the supervisor's status."""

    version: int
    sha256: str
    activated: float
    state: str
    error: str
    origin_problem: str  # why the origin cannot be registered with ("" once it can)
    failed_version: int
    pinned: int  # the version an operator rolled back to, kept until the next publish
    refused: dict[str, int]


class Status(TypedDict):
    ready: bool
    summary: str
    degraded: str | None
    pop: str
    mode: str
    snapshot: SnapshotInfo
    sync: SyncReport
    draining: bool
    components: dict[str, dict[str, Any]]
    tuning: dict[str, Any]
    # The console shows staleness from checked_at, and does without the rest.
    events: NotRequired[dict[str, Any]]
    # Fleet budgets: the engine's allowance and its figures per campaign (engine /pacing),
    # the cache link, and why the last allowance was not taken ("" when it was).
    pacing: NotRequired[dict[str, Any]]
    serving_url: NotRequired[str]
    uptime_s: NotRequired[float]
    checked_at: NotRequired[float]
    health_interval: NotRequired[float]


# (method, path) -> the type of its 2xx answer; any other status answers Error.
ANSWERS: dict[tuple[str, str], Any] = {
    ("GET", "/v1/status"): Status, ("GET", "/v1/snapshots"): Snapshots,
    ("GET", "/v1/snapshots/diff"): Diff, ("GET", "/v1/cache"): Cache,
    ("GET", "/v1/events"): Events, ("GET", "/v1/logs"): Logs, ("GET", "/v1/tuning"): Tuning,
    ("POST", "/v1/tuning/apply"): WriteResult, ("GET", "/v1/xdp"): Xdp,
    ("POST", "/v1/xdp/block"): WriteResult, ("POST", "/v1/xdp/unblock"): WriteResult,
    ("POST", "/v1/sync-now"): WriteResult, ("POST", "/v1/rollback"): WriteResult,
    ("POST", "/v1/drain"): WriteResult, ("POST", "/v1/undrain"): WriteResult,
}


def conforms(value: Any, kind: Any, where: str = "$") -> list[str]:
    """What in `value` (decoded JSON) does not match `kind`, one line each; [] when all does."""
    if kind is Any:
        return []
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = get_args(kind)
        if any(not conforms(value, option, where) for option in options):
            return []
        return [f"{where}: {value!r} is none of {options}"]
    if isinstance(kind, type) and hasattr(kind, "__required_keys__"):  # a TypedDict
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        hints = get_type_hints(kind)
        problems = [f"{where}.{key}: missing" for key in sorted(kind.__required_keys__)
                    if key not in value]
        problems += [f"{where}.{key}: not in {kind.__name__}" for key in sorted(value)
                     if key not in hints]
        for key, item in value.items():
            if key in hints:
                problems += conforms(item, hints[key], f"{where}.{key}")
        return problems
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        (item_kind,) = get_args(kind)
        return [p for i, item in enumerate(value) for p in conforms(item, item_kind,
                                                                      f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        _, item_kind = get_args(kind)
        return [p for key, item in value.items() for p in conforms(item, item_kind,
                                                                     f"{where}.{key}")]
    if kind is type(None):
        return [] if value is None else [f"{where}: expected null, got {value!r}"]
    if kind is float:  # JSON has one number type: a whole number is a float too
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    return [] if ok else [f"{where}: expected {kind.__name__}, got {value!r}"]
