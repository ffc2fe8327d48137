"""Configuration of the appliance and the origin, driven by ONE table of settings.

Every setting is declared once in `SETTINGS` (scope, section, key, kind, default, help and an
optional check). From that table come the frozen dataclasses the code reads, the TOML parser
with its error messages, drop-in layering and `adpop config dump`.

Files: `<name>.toml` plus drop-ins `<name>.d/*.toml` read in name order. A later file wins for
scalars; lists append (so a drop-in can add a trusted key without repeating the others).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Literal, TypeVar, cast, overload

from appliance import cpulist, ports
from appliance.errors import AdpopError


class ConfigError(AdpopError):
    """A configuration file has problems; `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        first = self.problems[0].line() if self.problems else "invalid configuration"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(first + more, hint="run `adpop config check FILE` to list them all")


class Scope(str, Enum):
    """Which program a configuration file belongs to."""

    APPLIANCE = "appliance"
    ORIGIN = "origin"


class Kind(str, Enum):
    """Value kinds a setting can have; each has one parser and one formatter below."""

    STR = "string"
    OPT_STR = "string (\"\" for none)"
    INT = "integer"
    BOOL = "boolean"
    PATH = "path"
    OPT_PATH = "path (\"\" for none)"
    STRLIST = "list of strings"
    DURATION = "duration"
    SIZE = "size"


Value = str | int | bool | list[str]
"""What a setting holds once parsed: its kind decides which of these."""


@dataclass(frozen=True)
class Setting:
    """One configuration setting: where it lives, what it holds, what it defaults to, why."""

    scope: Scope
    section: str
    key: str
    kind: Kind
    default: Value
    help: str
    # Returns the fix when the parsed value is out of bounds, None when it is fine.
    check: Callable[[Value], str | None] | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else "write one of " + ", ".join(choices)
    return check


def _at_least(low: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if value >= low else f"use a value of at least {low}"

    return check


def identifier_fix(value: str) -> str | None:
    """The fix for a name that cannot be a PoP id or group (None when it can)."""
    if re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", value):
        return None
    return "use 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"


def _cpu_list(value: str) -> str | None:
    try:
        cpulist.parse(value)
    except cpulist.CpuListError as exc:
        return exc.line()
    return None


def listen_addresses(value: str) -> list[tuple[str, int]]:
    """"HOST:PORT" or "[IPV6]:PORT", comma-separated, as (host, port) pairs; raises
    ValueError naming the fix. The engine parses the same text itself."""
    import ipaddress  # here: the CLI's start-up pays for it only when checking addresses

    found = []
    for item in (part.strip() for part in value.split(",")):
        host, colon, port = item.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            address = ipaddress.ip_address(host[1:-1] if bracketed else host)
        except ValueError:
            address = None
        if not colon or not port.isdigit() or int(port) > 65535 or address is None or \
                (address.version == 6) != bracketed:
            raise ValueError(f"{item!r} is not HOST:PORT; use an IPv4 address (127.0.0.1:8080) "
                             "or an IPv6 one in brackets ([::]:8080 takes IPv4 too)")
        found.append((str(address), int(port)))
    return found


def _listen(value: str) -> str | None:
    try:
        listen_addresses(value)
    except ValueError as exc:
        return str(exc)
    return None


def _optional_listen(value: str) -> str | None:
    return _listen(value) if value else None


def _one_listen(value: str) -> str | None:
    if "," in value:
        return "one HOST:PORT only (this server listens on one address)"
    return _listen(value)


def _optional_one_listen(value: str) -> str | None:
    return _one_listen(value) if value else None


def _unit_name(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9:_.\\@-]+\.service", value):
        return None
    return "give a systemd service name, e.g. adpop-engine.service"


def _optional_unit_name(value: str) -> str | None:
    return _unit_name(value) if value else None


def _group_name(value: str) -> str | None:
    if not value or re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        return None
    return "give a group name (a-z, 0-9, '_' or '-', at most 32), or \"\""


def _between(low: int, high: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"use a value from {low} to {high}"

    return check


def _http_url(value: str) -> str | None:
    """An http:// or https:// URL with a host (and a valid port when it names one)."""
    from urllib.parse import urlsplit  # here: only checking a URL pays for the import

    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or \
            not port_ok:
        return "use an http:// or https:// URL with a host, e.g. https://origin.example:8700"
    return None


def port_range(value: str) -> tuple[int, int]:
    """"N-M" as (N, M); raises ValueError with the fix when it is not a usable range of
    unprivileged ports."""
    try:
        first, last = ports.span(value, "port range")
    except ports.PortError:
        first = last = 0
    if "-" not in value or not 1024 <= first < last:
        raise ValueError('use a range from 1024 to 65535, the lower port first, like '
                         '"32768-60999"')
    return first, last


def _port_range(value: str) -> str | None:
    try:
        port_range(value)
    except ValueError as exc:
        return str(exc)
    return None


T = TypeVar("T", str, int, bool, list[str])


def setting(kind: Kind, default: T, help: str,
            check: Callable[[T], str | None] | None = None) -> T:
    """One field of a section class, with what the table needs in its metadata: the value
    kind (parser and formatter), the help (the shipped file's comment) and the check (the
    fix when a value is out of bounds). Typed as its value so that mypy sees `int`, not a
    Field, and so checks the readers."""
    meta = {"kind": kind, "help": help, "check": check, "default": default}
    if isinstance(default, list):
        # A list default is shared by every instance unless copied; frozen stops rebinding,
        # not appending.
        made: T = field(default_factory=functools.partial(list, default), metadata=meta)
        return made
    plain: T = field(default=default, metadata=meta)
    return plain


@dataclass(frozen=True)
class PopSettings:
    """[pop] of the appliance."""

    target_group: str = setting(
        Kind.STR, "default",
        "Snapshot target group this PoP serves; snapshots for other groups are refused.",
        identifier_fix)
    id: str = setting(
        Kind.STR, "pop-1",
        "This PoP's name at the origin (fleet table, rollout stages, reports).",
        identifier_fix)


@dataclass(frozen=True)
class PathsSettings:
    """[paths] of the appliance."""

    state_dir: str = setting(
        Kind.PATH, "/var/lib/adpop",
        "Where the PoP keeps its state: snapshots/<version>/, the current link, "
        "the high-water mark.")


@dataclass(frozen=True)
class SnapshotSettings:
    """[snapshot] of the appliance."""

    trust_root: str = setting(
        Kind.PATH, "trust/root.json",
        "The origin's TUF root.json this PoP trusts from the start (put in by the image, "
        "`adpop flash` or `adpop pop trust FILE`); key rotations are followed from it. "
        "Relative paths are under paths.state_dir.")
    clock_skew: int = setting(
        Kind.DURATION, 300,
        "Slack allowed between this PoP's clock and the origin's when checking expiry.",
        _at_least(0))
    max_manifest_bytes: int = setting(
        Kind.SIZE, 64 * 1024,
        "Largest manifest accepted; checked before the manifest is parsed.",
        _at_least(256))
    max_payload_bytes: int = setting(
        Kind.SIZE, 4 * 1024**3,
        "Largest payload accepted; checked against the manifest before anything is read.",
        _at_least(1024))
    nesting_limit: int = setting(
        Kind.INT, 16,
        "Cap'n Proto nesting limit when reading a payload (the schema nests 7 deep).",
        _at_least(8))
    keep_versions: int = setting(
        Kind.INT, 5,
        "Snapshot versions kept on disk, the active one included (room to roll back).",
        _at_least(2))
    max_jump_percent: int = setting(
        Kind.INT, 50,
        "Hold a snapshot whose campaign count or payload size moves more than this percentage "
        "from the active one, unless its manifest allows the jump (0: no hold).",
        _at_least(0))
    max_ecpm_micros: int = setting(
        Kind.INT, 10_000 * 1_000_000,
        "Refuse a snapshot with a campaign bidding above this eCPM (micros of the currency "
        "unit): a generated file can be signed and still wrong.",
        _at_least(1))
    max_budget_daily_micros: int = setting(
        Kind.INT, 10_000_000 * 1_000_000,
        "Refuse a snapshot with a campaign whose daily budget is above this (micros).",
        _at_least(1))


@dataclass(frozen=True)
class SyncSettings:
    """[sync] of the appliance."""

    origin_url: str = setting(
        Kind.STR, "https://127.0.0.1:8700",
        "Base URL of the origin this PoP registers with, polls and fetches snapshots from.",
        _http_url)
    poll_interval: int = setting(
        Kind.DURATION, 30,
        "Anti-entropy poll: a missed push notice is caught up within this long.",
        _at_least(1))
    push_listen: str = setting(
        Kind.OPT_STR, "127.0.0.1:8701",
        "HOST:PORT where push notices from the origin arrive (\"\" for polling only).",
        _optional_one_listen)
    push_address: str = setting(
        Kind.OPT_STR, "",
        "HOST:PORT the origin reaches push_listen at, sent once when the PoP enrolls (\"\": "
        "push_listen itself). Over TLS the origin pushes only there, to this PoP's "
        "certificate; moving it means enrolling again.",
        _optional_one_listen)
    fetch_timeout: int = setting(
        Kind.DURATION, 120,
        "Deadline for fetching one snapshot (manifest and payload); a slower origin is "
        "dropped and tried again at the next notice or poll.",
        _at_least(1))
    enrollment_token_file: str = setting(
        Kind.OPT_PATH, "enroll-token",
        "File (mode 0600) holding the one-time token this PoP enrolls with at its first start "
        "(`adpop origin pops enroll NAME --out FILE`, or `adpop flash --enrollment-token`); "
        "needed once, for an https:// origin. Relative paths are under paths.state_dir.")
    identity_dir: str = setting(
        Kind.PATH, "identity",
        "Folder of this PoP's key, certificate and the origin's CA (pop.key 0600, pop.pem, "
        "ca.pem), made at enrollment; relative paths are under paths.state_dir.")
    health_window: int = setting(
        Kind.DURATION, 10,
        "After activation, how long the engine must stay healthy before success is "
        "reported; a failure inside it reverts to the previous version.",
        _at_least(0))


@dataclass(frozen=True)
class EngineSettings:
    """[engine] of the appliance."""

    admin_socket: str = setting(
        Kind.OPT_PATH, "",
        "The engine's admin socket, told to load each activated snapshot (\"\": no engine).")
    binary: str = setting(
        Kind.PATH, "/usr/lib/adpop/adpop-engine",
        "The engine binary the supervisor runs in dev mode.")
    unit: str = setting(
        Kind.STR, "adpop-engine.service",
        "The engine's systemd unit, watched and restarted in appliance mode.",
        _unit_name)
    listen: str = setting(
        Kind.STR, "127.0.0.1:8080",
        "Addresses the engine serves ad requests on: HOST:PORT or [IPV6]:PORT, "
        "comma-separated; \"[::]:8080\" takes IPv4 and IPv6.",
        _listen)
    metrics_listen: str = setting(
        Kind.OPT_STR, "127.0.0.1:9180",
        "The one address serving the engine's /metrics (never the serving addresses); "
        "keep it on loopback or a management network (\"\": no metrics).",
        _optional_listen)
    shards: int = setting(
        Kind.INT, 1,
        "Serving threads, one per CPU.",
        _between(1, 1024))
    cpus: str = setting(
        Kind.OPT_STR, "",
        "CPUs to pin the shards to, e.g. \"2-5\" (\"\": unpinned); in the appliance "
        "also the engine unit's CPUAffinity, the cache getting the other CPUs.",
        _cpu_list)
    idle_poll_us: int = setting(
        Kind.INT, 0,
        "Microseconds a shard polls after its last event before it sleeps (0: sleep at "
        "once); worth it when shards have their own cores. Only a busy shard polls: one "
        "that waited for over a quarter of the last 100 ms sleeps at once.",
        _at_least(0))
    token_key: str = setting(
        Kind.PATH, "engine/token.key",
        "Secret signing tracking URLs (made at first start when missing); relative paths "
        "are under paths.state_dir.")
    spool: str = setting(
        Kind.PATH, "engine/spool",
        "Folder of the engine's event spool segments; relative paths are under "
        "paths.state_dir.")
    spool_warn_bytes: int = setting(
        Kind.SIZE, 256 * 1024**2,
        "Spool segments waiting to ship past this many bytes make the supervisor report "
        "degraded (the origin is not taking them fast enough, or not at all).",
        _at_least(1024**2))


def _nats_urls(value: str) -> str | None:
    for url in (part.strip() for part in value.split(",")):
        if not re.fullmatch(r"(nats|tls)://[^\s/:]+(:[0-9]{1,5})?", url):
            return (f"{url!r} is not a NATS server URL; write nats://HOST:PORT, several "
                    "comma-separated for a cluster")
    return None


@dataclass(frozen=True)
class EventsSettings:
    """[events] of the appliance: shipping the engine's spool to the origin."""

    transport: str = setting(
        Kind.STR, "http",
        "How batches reach the origin: http (POST /v1/events with this PoP's certificate) "
        "or nats (a JetStream stream that the origin's ingest workers consume).",
        _one_of("http", "nats"))
    nats_url: str = setting(
        Kind.STR, "nats://127.0.0.1:4222",
        "JetStream servers when transport = \"nats\", comma-separated.",
        _nats_urls)
    batch_bytes: int = setting(
        Kind.SIZE, 8 * 1024**2,
        "Largest batch of records sent at once (before compression): what a backlog drains "
        "in. Live traffic goes in smaller ones, at most a second old.",
        _between(4096, 16 * 1024**2))
    in_flight_bytes: int = setting(
        Kind.SIZE, 32 * 1024**2,
        "Batches sent and not yet acknowledged, at most this many bytes together.",
        _at_least(4096))
    spool_max_bytes: int = setting(
        Kind.SIZE, 1024**3,
        "Bound on the spool folder (everything not yet shipped). Past it the engine answers "
        "no-fill with reason spool_full, keeping room for the impressions and clicks of ads "
        "it already served, and serves again once shipping has made room.",
        _at_least(4 * 1024**2))


@dataclass(frozen=True)
class CacheSettings:
    """[cache] of the appliance."""

    address: str = setting(
        Kind.STR, "127.0.0.1:6379",
        "HOST:PORT of the local cache (Dragonfly or redis-server).",
        _one_listen)
    memory: int = setting(
        Kind.SIZE, 256 * 1024**2,
        "Memory limit of the cache (its maxmemory; in the appliance the unit's MemoryMax is "
        "a quarter above it).",
        _at_least(1024**2))
    password_file: str = setting(
        Kind.PATH, "secrets/cache.password",
        "File (mode 0600) holding the password the cache requires of every client, made at "
        "first start when missing; only the supervisor and the parts it runs read it. "
        "Relative paths are under paths.state_dir.")
    binary: str = setting(
        Kind.PATH, "redis-server",
        "The cache server the supervisor runs in dev mode.")
    unit: str = setting(
        Kind.OPT_STR, "",
        "The cache's systemd unit, watched and restarted in appliance mode (\"\": "
        "dragonfly.service when /usr/bin/dragonfly is installed, else adpop-redis.service, "
        "as the units' own conditions choose).",
        _optional_unit_name)


@dataclass(frozen=True)
class SupervisorSettings:
    """[supervisor] of the appliance."""

    mode: str = setting(
        Kind.STR, "appliance",
        "appliance: the parts run as their own systemd units; dev: the supervisor runs "
        "them as its child processes.",
        _one_of("appliance", "dev"))
    control_socket: str = setting(
        Kind.PATH, "/run/adpop/control.sock",
        "Unix socket of the control API (mode 0660); relative paths are under "
        "paths.state_dir.")
    operator_group: str = setting(
        Kind.OPT_STR, "adpop-ops",
        "Group that owns the control socket, so its members may use it (\"\": the "
        "supervisor's own group).",
        _group_name)
    ready_timeout: int = setting(
        Kind.DURATION, 120,
        "Time to reach serving before the supervisor reports ready in a degraded state "
        "that says what is missing.",
        _at_least(1))
    health_interval: int = setting(
        Kind.DURATION, 1,
        "Between health rounds; each round pings the watchdog.",
        _at_least(1))


@dataclass(frozen=True)
class TuningSettings:
    """[tuning] of the appliance."""

    nics: list[str] = setting(
        Kind.STRLIST, [],
        "Serving NICs whose IRQs, queues and steering are tuned; a bond stands for its "
        "slaves ([]: every NIC backed by a device).")
    housekeeping_cpus: str = setting(
        Kind.OPT_STR, "",
        "CPUs for everything but the shards: other IRQs, the cache, the supervisor "
        "(\"\": every online CPU not in engine.cpus).",
        _cpu_list)
    hugepage_size: str = setting(
        Kind.STR, "2M",
        "Huge page size reserved for the shards.",
        _one_of("2M", "1G"))
    hugepages_per_shard: int = setting(
        Kind.SIZE, 256 * 1024**2,
        "Huge page memory reserved per shard, on the shard's NUMA node (0: none).",
        _at_least(0))
    sysctl: list[str] = setting(
        Kind.STRLIST, [],
        "\"key=value\" sysctl settings on top of the latency profile (a later one wins).")
    busy_poll_us: int = setting(
        Kind.INT, 0,
        "net.core.busy_poll and busy_read in microseconds, when the engine busy-polls its "
        "sockets (0: off).",
        _at_least(0))
    governor: str = setting(
        Kind.STR, "performance",
        "CPU frequency governor of the shard CPUs, where the host has cpufreq.",
        _one_of("performance", "schedutil", "ondemand", "conservative", "powersave",
        "userspace"))
    thp: str = setting(
        Kind.STR, "madvise",
        "Transparent huge pages mode.",
        _one_of("always", "madvise", "never"))
    local_port_range: str = setting(
        Kind.STR, "32768-60999",
        "Ports the kernel picks for this host's own connections (to the origin, DNS): "
        "adpop tune sets net.ipv4.ip_local_port_range to it and the XDP filter lets "
        "replies in on it. Keep it clear of the ports this host listens on.",
        _port_range)
    drift_check: bool = setting(
        Kind.BOOL, True,
        "The supervisor re-verifies the tuning (periodically and on device events) and "
        "repairs drift through adpop-tune.service.")
    drift_interval: int = setting(
        Kind.DURATION, 60,
        "Between periodic drift checks.",
        _at_least(1))
    repairs_per_hour: int = setting(
        Kind.INT, 6,
        "Most drift repairs in any hour; drift beyond it is counted and reported, not "
        "fought.",
        _at_least(0))


@dataclass(frozen=True)
class XdpSettings:
    """[xdp] of the appliance."""

    nics: list[str] = setting(
        Kind.STRLIST, [],
        "NICs the filter is attached to ([]: the serving NICs of tuning.nics, or every NIC "
        "backed by a device).")
    object: str = setting(
        Kind.PATH, "/usr/lib/adpop/filter.bpf.o",
        "The compiled filter program.")
    pin_dir: str = setting(
        Kind.PATH, "/sys/fs/bpf/adpop",
        "bpffs folder where the filter's maps are pinned (kept across re-attaches).")
    rate_pps: int = setting(
        Kind.INT, 0,
        "Packets per second allowed from one source address (0: no rate limit).",
        _at_least(0))
    burst: int = setting(
        Kind.INT, 100,
        "Packets one source may send at once above its rate.",
        _at_least(1))
    enforce_ports: bool = setting(
        Kind.BOOL, True,
        "Drop TCP and UDP to destination ports not on the allowlists.")
    allow_tcp_ports: list[str] = setting(
        Kind.STRLIST, ["22", "80", "443", "8080"],
        "TCP destination ports (\"N\" or \"N-M\") that pass.")
    allow_udp_ports: list[str] = setting(
        Kind.STRLIST, ["68"],
        "UDP destination ports (\"N\" or \"N-M\") that pass (68: the DHCP client's "
        "leases).")
    drop_fragments: bool = setting(
        Kind.BOOL, False,
        "Drop IPv4 and IPv6 fragments.")
    blocklist: str = setting(
        Kind.OPT_PATH, "",
        "File of CIDRs (one per line, # comments) loaded at every attach.")


@dataclass(frozen=True)
class OriginSnapshotSettings:
    """[snapshot] of the origin."""

    root_keys: int = setting(
        Kind.INT, 3,
        "Root keys the origin's TUF repository is made with (`adpop origin keys init`); "
        "keep all but the running origin's share offline.",
        _at_least(1))
    root_threshold: int = setting(
        Kind.INT, 2,
        "Root keys that must sign a new root (a key rotation) before PoPs follow it.",
        _at_least(1))
    target_group: str = setting(
        Kind.STR, "default",
        "Target group written into manifests built with this configuration.",
        identifier_fix)
    ttl: int = setting(
        Kind.DURATION, 7 * 86400,
        "How long a published snapshot stays valid; PoPs refuse it after that.",
        _at_least(60))


@dataclass(frozen=True)
class OriginSettings:
    """[origin] of the origin."""

    listen: str = setting(
        Kind.STR, "127.0.0.1:8700",
        "HOST:PORT the origin's HTTP API listens on.",
        _one_listen)
    state_dir: str = setting(
        Kind.PATH, "/var/lib/adpop-origin",
        "Where the origin keeps its campaign database (origin.sqlite) and published payloads.")
    push_parallelism: int = setting(
        Kind.INT, 16,
        "Push notices in flight at once.",
        _at_least(1))
    tls: str = setting(
        Kind.STR, "private-ca",
        "How the API speaks TLS: private-ca (a server certificate from the origin's own CA "
        "for origin.tls_hosts; PoPs get the CA when they enroll), files (origin.tls_cert and "
        "origin.tls_key), off (plain HTTP, for loopback development). With TLS, PoP routes "
        "take the PoP's id from its client certificate.",
        _one_of("private-ca", "files", "off"))
    tls_hosts: list[str] = setting(
        Kind.STRLIST, ["127.0.0.1", "localhost"],
        "Names and addresses the private-ca server certificate is for (what PoPs connect to).")
    tls_cert: str = setting(
        Kind.OPT_PATH, "",
        "The server certificate chain (PEM) when origin.tls = \"files\"; relative paths are "
        "under origin.state_dir.")
    tls_key: str = setting(
        Kind.OPT_PATH, "",
        "Its private key (PEM, mode 0600) when origin.tls = \"files\"; relative paths are "
        "under origin.state_dir.")


@dataclass(frozen=True)
class OriginEventsSettings:
    """[events] of the origin: where PoPs' event batches arrive."""

    transport: str = setting(
        Kind.STR, "http",
        "Where batches arrive: http (POST /v1/events only) or nats (also consumed from the "
        "JetStream stream by events.ingest_workers pull consumers in `adpop origin serve`, "
        "or in `adpop origin ingest`).",
        _one_of("http", "nats"))
    nats_url: str = setting(
        Kind.STR, "nats://127.0.0.1:4222",
        "JetStream servers when transport = \"nats\", comma-separated.",
        _nats_urls)
    ingest_workers: int = setting(
        Kind.INT, 2,
        "Pull consumers storing batches from JetStream, sharing one durable consumer.",
        _between(1, 64))
    nats_replicas: int = setting(
        Kind.INT, 1,
        "Copies JetStream keeps of each batch (1 for one server, 3 for a three-node "
        "cluster, which then loses none when a node fails).",
        _between(1, 5))


@dataclass(frozen=True)
class PacingSettings:
    """[pacing] of the origin: budgets across the fleet."""

    interval: int = setting(
        Kind.DURATION, 10,
        "How often the origin gives every PoP a new signed allowance per budgeted campaign "
        "(each good for three intervals: a PoP cut off stops that long after).",
        _between(1, 3600))


@dataclass(frozen=True)
class RolloutSettings:
    """[rollout] of the origin."""

    canaries: list[str] = setting(
        Kind.STRLIST, [],
        "PoP ids that get each new version first; a failure among them halts the rollout.")
    percent: int = setting(
        Kind.INT, 25,
        "Share of the remaining PoPs in the second stage, before all of them, in percent.",
        _between(1, 100))
    stage_timeout: int = setting(
        Kind.DURATION, 120,
        "How long a stage waits for its PoPs to report success before the rollout halts.",
        _at_least(1))


@dataclass(frozen=True)
class ApplianceConfig:
    """The PoP's configuration (`appliance.toml`): one frozen class per section."""

    pop: PopSettings = field(default_factory=PopSettings)
    paths: PathsSettings = field(default_factory=PathsSettings)
    snapshot: SnapshotSettings = field(default_factory=SnapshotSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    tuning: TuningSettings = field(default_factory=TuningSettings)
    xdp: XdpSettings = field(default_factory=XdpSettings)


@dataclass(frozen=True)
class OriginConfig:
    """The origin's configuration (`origin.toml`)."""

    snapshot: OriginSnapshotSettings = field(default_factory=OriginSnapshotSettings)
    origin: OriginSettings = field(default_factory=OriginSettings)
    events: OriginEventsSettings = field(default_factory=OriginEventsSettings)
    pacing: PacingSettings = field(default_factory=PacingSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)


Config = ApplianceConfig | OriginConfig
ConfigT = TypeVar("ConfigT", ApplianceConfig, OriginConfig)
TOPS: dict[Scope, type[ApplianceConfig] | type[OriginConfig]] = {
    Scope.APPLIANCE: ApplianceConfig, Scope.ORIGIN: OriginConfig}


def _section_classes(scope: Scope) -> dict[str, type]:
    """Section name -> its class, in file order (the top class's field order)."""
    return {f.name: cast(type, f.default_factory) for f in dataclasses.fields(TOPS[scope])}


def _table() -> tuple[Setting, ...]:
    rows: list[Setting] = []
    for scope in Scope:
        for section, cls in _section_classes(scope).items():
            for f in dataclasses.fields(cls):
                m = f.metadata
                rows.append(Setting(scope, section, f.name, m["kind"], m["default"], m["help"],
                                    m["check"]))
    return tuple(rows)


SETTINGS: tuple[Setting, ...] = _table()
"""Every setting of both scopes, read off the section classes: what the TOML reader, `config
check`, `config dump` and the shipped files use."""



_UNITS_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_UNITS_SIZE = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


class ValueProblem(Exception):
    """A value could not be parsed as its setting's kind; the message is the fix."""


def parse_duration(value: object) -> int:
    """Seconds from an integer or a string such as "30s", "5m", "12h", "7d", "2w"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
        if match:
            return int(match.group(1)) * _UNITS_DURATION[match.group(2)]
    raise ValueProblem('write a duration such as 30 (seconds), "30s", "5m", "12h" or "7d"')


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "64KiB", "2GiB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*", value)
        if match:
            return int(match.group(1)) * _UNITS_SIZE[match.group(2) or ""]
    raise ValueProblem('write a size such as 65536 (bytes), "64KiB", "512MiB" or "2GiB"')


def format_duration(seconds: int) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS_DURATION[unit] == 0:
            return f"{seconds // _UNITS_DURATION[unit]}{unit}"
    return f"{seconds}s"


def format_size(size: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _UNITS_SIZE[unit] == 0:
            return f"{size // _UNITS_SIZE[unit]}{unit}"
    return str(size)


def _parse_value(kind: Kind, value: object) -> Value:
    if kind in (Kind.STR, Kind.PATH):
        if not isinstance(value, str) or not value:
            raise ValueProblem(f"write a non-empty quoted {kind.value}")
        return value
    if kind in (Kind.OPT_STR, Kind.OPT_PATH):
        if not isinstance(value, str):
            raise ValueProblem('write a quoted string, or "" for none')
        return value
    if kind is Kind.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueProblem("write a whole number without quotes")
        return value
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise ValueProblem("write true or false without quotes")
        return value
    if kind is Kind.STRLIST:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueProblem('write a list of non-empty quoted strings, e.g. ["a", "b"]')
        return [str(v) for v in value]
    if kind is Kind.DURATION:
        return parse_duration(value)
    if kind is Kind.SIZE:
        return parse_size(value)
    raise AssertionError(kind)


def _format_value(kind: Kind, value: Value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_string(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if kind is Kind.DURATION:
        return _toml_string(format_duration(value))
    if kind is Kind.SIZE:
        return _toml_string(format_size(value))
    return str(value)


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def settings_for(scope: Scope) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.scope is scope)


def _sections(scope: Scope) -> dict[str, list[Setting]]:
    sections: dict[str, list[Setting]] = {}
    for setting in settings_for(scope):
        sections.setdefault(setting.section, []).append(setting)
    return sections


@dataclass(frozen=True)
class Problem:
    """One problem in one file: which key, what is wrong, how to fix it."""

    file: str
    key: str
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.file}: {self.key}: {self.message}; fix: {self.fix}"


@dataclass
class _Layered:
    values: dict[tuple[str, str], Value] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def dropin_files(path: Path) -> list[Path]:
    """`<name>.d/*.toml` beside `<name>.toml`, in name order (later ones win)."""
    folder = path.with_name(path.stem + ".d")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".toml" and p.is_file())


def _read_file(path: Path, scope: Scope, into: _Layered) -> None:
    name = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        into.problems.append(Problem(name, "-", f"cannot read: {exc.strerror}",
                                     "check the path and its permissions"))
        return
    except UnicodeDecodeError:
        into.problems.append(Problem(name, "-", "not UTF-8 text", "save the file as UTF-8"))
        return
    except tomllib.TOMLDecodeError as exc:
        into.problems.append(Problem(name, "-", f"TOML syntax error: {exc}",
                                     "correct the TOML syntax at that line"))
        return
    into.sources.append(path)
    sections = _sections(scope)
    for section, table in raw.items():
        if section not in sections:
            into.problems.append(Problem(name, section, "unknown section",
                                         _did_you_mean(section, sections)))
            continue
        if not isinstance(table, dict):
            into.problems.append(Problem(name, section, "not a table",
                                         f"write it as a [{section}] table"))
            continue
        by_key = {s.key: s for s in sections[section]}
        for key, value in table.items():
            setting = by_key.get(key)
            if setting is None:
                into.problems.append(Problem(name, f"{section}.{key}", "unknown key",
                                             _did_you_mean(key, by_key, section)))
                continue
            try:
                parsed = _parse_value(setting.kind, value)
            except ValueProblem as exc:
                into.problems.append(Problem(name, setting.name,
                                             f"expected a {setting.kind.value}", str(exc)))
                continue
            fix = setting.check(parsed) if setting.check else None
            if fix:
                into.problems.append(Problem(name, setting.name,
                                             f"value {value!r} is out of bounds", fix))
                continue
            slot = (section, key)
            earlier = into.values.get(slot)
            if isinstance(earlier, list) and isinstance(parsed, list):
                into.values[slot] = earlier + parsed
            else:
                into.values[slot] = parsed


def _did_you_mean(word: str, choices: Iterable[str], section: str | None = None) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{section + '.' if section else ''}{close[0]}'?"
    listed = ", ".join(sorted(choices))
    return f"remove it; known {'keys' if section else 'sections'}: {listed}"


def scope_of(path: Path) -> Scope:
    """Guess the scope from the file name: origin*.toml (or inside origin*.d) is the origin's."""
    for part in (path.name, path.parent.name):
        if part.startswith("origin"):
            return Scope.ORIGIN
    return Scope.APPLIANCE


def check_files(paths: Sequence[Path], scope: Scope) -> list[Problem]:
    """All problems in the given files, in order; an empty list means they are valid."""
    layered = _Layered()
    for path in paths:
        _read_file(path, scope, layered)
    _check_together(scope, layered)
    return layered.problems


def _executable(value: str) -> bool:
    import shutil  # here: only checking a binary pays for the import

    return shutil.which(value) is not None


def _check_together(scope: Scope, layered: _Layered) -> None:
    """Checks one setting's value cannot make alone: in dev mode the supervisor runs
    engine.binary and cache.binary itself, so they must be executables (in the appliance
    the units name their own); an origin serving TLS from files needs both files named."""
    if not layered.sources:
        return
    defaults = {(s.section, s.key): s.default for s in SETTINGS if s.scope is scope}

    def value(section: str, key: str) -> Value:
        return layered.values.get((section, key), defaults[(section, key)])

    if scope is Scope.ORIGIN:
        if value("origin", "tls") == "files":
            for key in ("tls_cert", "tls_key"):
                if not value("origin", key):
                    layered.problems.append(Problem(
                        str(layered.sources[-1]), f"origin.{key}",
                        "empty while origin.tls = \"files\"",
                        "give the PEM file's path, or set origin.tls = \"private-ca\""))
        keys, threshold = value("snapshot", "root_keys"), value("snapshot", "root_threshold")
        if isinstance(keys, int) and isinstance(threshold, int) and threshold > keys:
            layered.problems.append(Problem(
                str(layered.sources[-1]), "snapshot.root_threshold",
                f"{threshold} is more than the {keys} root keys",
                "lower it to snapshot.root_keys or fewer"))
        return

    if value("supervisor", "mode") != "dev":
        return
    for section in ("engine", "cache"):
        binary = str(value(section, "binary"))
        if not _executable(binary):
            layered.problems.append(Problem(
                str(layered.sources[-1]), f"{section}.binary",
                f"{binary!r} is not an executable file (dev mode runs it)",
                "give the path of the installed binary" + (
                    " (`make setup` builds engine/build/adpop-engine)" if section == "engine"
                    else " (e.g. /usr/bin/redis-server)")))


def under(base: str | Path, path: str | Path) -> Path:
    """`path` as given when absolute, else inside `base` (the state directory)."""
    return Path(base) / path


def replace_value(config: ConfigT, section: str, key: str, value: Value) -> ConfigT:
    """`config` with one setting replaced (a command-line override)."""
    return replace(config, **{section: replace(getattr(config, section), **{key: value})})


def with_state(config: ConfigT, state: str | Path | None) -> ConfigT:
    """`config` with its state directory moved to `state` (the --state flag), if given."""
    if not state:
        return config
    if isinstance(config, ApplianceConfig):
        return replace(config, paths=replace(config.paths, state_dir=str(state)))
    return replace(config, origin=replace(config.origin, state_dir=str(state)))


@overload
def load(scope: Literal[Scope.APPLIANCE], path: Path | None = None) -> ApplianceConfig: ...
@overload
def load(scope: Literal[Scope.ORIGIN], path: Path | None = None) -> OriginConfig: ...
@overload
def load(scope: Scope, path: Path | None = None) -> Config: ...
def load(scope: Scope, path: Path | None = None) -> Config:
    """The effective configuration: defaults, then `path`, then its drop-ins.

    Raises ConfigError listing every problem found, so the operator fixes them in one pass.
    A missing `path` is an error; `None` means defaults only.
    """
    layered = _Layered()
    if path is not None:
        if not path.is_file():
            raise ConfigError([Problem(str(path), "-", "no such file",
                                       "give the path of an existing TOML file")])
        for file in [path, *dropin_files(path)]:
            _read_file(file, scope, layered)
        _check_together(scope, layered)
    if layered.problems:
        raise ConfigError(layered.problems)
    return build(scope, layered.values)


@overload
def build(scope: Literal[Scope.APPLIANCE],
          values: dict[tuple[str, str], Value] | None = None) -> ApplianceConfig: ...
@overload
def build(scope: Literal[Scope.ORIGIN],
          values: dict[tuple[str, str], Value] | None = None) -> OriginConfig: ...
@overload
def build(scope: Scope, values: dict[tuple[str, str], Value] | None = None) -> Config: ...
def build(scope: Scope, values: dict[tuple[str, str], Value] | None = None) -> Config:
    """A config object of `scope` from its defaults overridden by `values` (already parsed
    and checked)."""
    values = values or {}
    sections = {
        section: cls(**{key: value for (sec, key), value in values.items() if sec == section})
        for section, cls in _section_classes(scope).items()}
    return TOPS[scope](**sections)


def dump(config: Config, scope: Scope) -> str:
    """The configuration as TOML, each setting preceded by its help as a comment."""
    lines: list[str] = [f"# adpop {scope.value} configuration. Drop-ins: "
                        f"{scope.value}.d/*.toml (later wins; lists append)."]
    for section, settings in _sections(scope).items():
        lines.append("")
        lines.append(f"[{section}]")
        for one in settings:
            value = getattr(getattr(config, section), one.key)
            lines.append(f"# {one.help}")
            lines.append(f"{one.key} = {_format_value(one.kind, value)}")
    return "\n".join(lines) + "\n"
