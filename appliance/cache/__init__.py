"""The PoP's local cache: Dragonfly in the image, redis-server as the embedded default.

Both speak the Redis protocol; the supervisor only needs its address. In dev mode it runs
redis-server itself (`redis_argv`); in the appliance, systemd runs dragonfly.service (or
adpop-redis.service when the image carries no Dragonfly package).

Key layout: engine/CACHE.md, the one description of what the engine keeps here (spend and
reservations per campaign and shard, the impression dedup window).

Health: PING round trip, memory used against the limit, evicted keys and connected clients.

Access: every client must AUTH with the password in cache.password_file (0600). The servers
read it from files of their own beside it (SECRET_FILES), never from their command line,
which any local user can read in /proc: redis-server takes a configuration file as its first
argument, Dragonfly a --flagfile. Under systemd those files reach the cache units as
credentials (LoadCredential=, the `%d` directory), so the sandboxed dynamic user reads them.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from appliance import secrets
from appliance.config import CacheSettings
from appliance.errors import AdpopError

PING_TIMEOUT = 1.0
# Above this share of its memory limit the cache is healthy but says it is nearly full.
MEMORY_WARN = 0.9


class CacheError(AdpopError):
    """The cache cannot be reached or answered wrongly."""


@dataclass(frozen=True)
class CacheHealth:
    """One look at the cache: whether it answers, and how it is doing."""

    ok: bool
    reason: str
    ping_ms: float = 0.0
    used_memory: int = 0
    max_memory: int = 0
    evicted_keys: int = 0
    connected_clients: int = 0


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT of the cache; raises CacheError naming the fix."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CacheError(f"cache address {address!r} is not HOST:PORT",
                         hint='write e.g. cache.address = "127.0.0.1:6379"')
    return host, int(port)


DRAGONFLY = Path("/usr/bin/dragonfly")


def appliance_unit(dragonfly: Path = DRAGONFLY) -> str:
    """The cache unit the image runs: dragonfly.service when the image carries Dragonfly,
    else adpop-redis.service (the same choice as the units' ConditionFileIsExecutable=)."""
    return "dragonfly.service" if os.access(dragonfly, os.X_OK) else "adpop-redis.service"


# Server -> the file beside the password that gives it to that server.
SECRET_FILES = {"redis": "cache.redis.conf", "dragonfly": "cache.dragonfly.flags"}
# Stands for systemd's credentials directory (`%d`) in a command line the generator writes.
CREDENTIALS = "\0credentials"


def write_secrets(password_file: Path) -> str:
    """The cache password (made when missing) and, beside it, the files that give it to
    each server. Returns the password."""
    password = secrets.ensure(password_file)
    for server, text in (("redis", f"requirepass {password}\n"),
                         ("dragonfly", f"--requirepass={password}\n")):
        secrets.write(password_file.parent / SECRET_FILES[server], text)
    return password


def redis_argv(binary: str, address: str, memory: int, folder: Path,
               secret_dir: str | Path) -> list[str]:
    """redis-server as the embedded cache: its password from the file in `secret_dir`,
    bounded memory, LRU eviction, a snapshot file in `folder` so a restart comes back warm,
    no protected-mode surprises on loopback."""
    host, port = parse_address(address)
    return [binary, f"{secret_dir}/{SECRET_FILES['redis']}", "--bind", host, "--port", str(port),
            "--maxmemory", str(memory),
            "--maxmemory-policy", "allkeys-lru", "--dir", str(folder), "--dbfilename",
            "cache.rdb", "--save", "300 1", "--appendonly", "no", "--daemonize", "no",
            "--protected-mode", "no", "--logfile", ""]


def dragonfly_argv(binary: str, address: str, memory: int, folder: Path,
                   threads: int, secret_dir: str | Path) -> list[str]:
    """Dragonfly as the appliance's cache: the same bounds and password as redis_argv,
    evicting like a cache, one proactor thread per CPU it is pinned to (the housekeeping
    CPUs)."""
    host, port = parse_address(address)
    return [binary, f"--flagfile={secret_dir}/{SECRET_FILES['dragonfly']}",
            f"--bind={host}", f"--port={port}", f"--maxmemory={memory}",
            "--cache_mode=true", f"--dir={folder}", "--dbfilename=cache",
            "--snapshot_cron=*/5 * * * *", f"--proactor_threads={threads}", "--logtostderr"]


def server_argv(server: str, binary: str, cache: CacheSettings, folder: Path, threads: int,
                secret_dir: str | Path) -> list[str]:
    """The command line of `server` ("dragonfly" or "redis") for the configuration's cache
    section: what `adpop cache run` execs and what the generator writes into the units."""
    if server == "dragonfly":
        return dragonfly_argv(binary, cache.address, cache.memory, folder, threads, secret_dir)
    return redis_argv(binary, cache.address, cache.memory, folder, secret_dir)


class CacheReplyError(AdpopError):
    """The cache answered, but not as the Redis protocol says a healthy server does."""


async def probe(address: str, password: str = "") -> CacheHealth:
    """AUTH (with a password), PING and INFO on one connection, each bounded by
    PING_TIMEOUT; never raises.

    Two commands of the Redis protocol, spoken here directly: a client library's import
    alone took most of a second of the supervisor's start on an emulated boot."""
    host, port = parse_address(address)
    writer: asyncio.StreamWriter | None = None
    try:
        reader, opened = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                PING_TIMEOUT)
        writer = opened
        if password:
            ok = await asyncio.wait_for(_command(reader, opened, "AUTH", password), PING_TIMEOUT)
            if ok != "OK":
                raise CacheReplyError(f"AUTH answered {ok[:80]!r}")
        started = time.monotonic()
        pong = await asyncio.wait_for(_command(reader, opened, "PING"), PING_TIMEOUT)
        ping_ms = (time.monotonic() - started) * 1000
        if pong != "PONG":
            raise CacheReplyError(f"PING answered {pong[:80]!r}")
        info = parse_info(await asyncio.wait_for(_command(reader, opened, "INFO"), PING_TIMEOUT))
    except TimeoutError:
        return CacheHealth(False, f"cache at {address} not answering within {PING_TIMEOUT:g} s")
    except (OSError, CacheReplyError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError) as exc:
        return CacheHealth(False, f"cache at {address} not answering: {_reason(exc)}")
    finally:
        if writer is not None:
            writer.close()
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    reason = ""
    if limit and used > MEMORY_WARN * limit:
        reason = f"memory {used / limit:.0%} of its limit"
    return CacheHealth(True, reason, ping_ms, used, limit, int(info.get("evicted_keys", 0)),
                       int(info.get("connected_clients", 0)))


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str,
                   *args: str) -> str:
    """One command; its reply, a simple or a bulk string (RESP)."""
    words = [name.encode(), *(arg.encode() for arg in args)]
    writer.write(f"*{len(words)}\r\n".encode()
                 + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
    await writer.drain()
    line = (await reader.readuntil(b"\r\n"))[:-2].decode(errors="replace")
    kind, rest = line[:1], line[1:]
    if kind == "+":
        return rest
    if kind == "$" and rest.isdigit():
        body = await reader.readexactly(int(rest) + 2)
        return body[:-2].decode(errors="replace")
    if kind == "-":
        # The error names the command only: an AUTH refusal must not echo the password.
        raise CacheReplyError(f"{name} refused: {rest[:120]}")
    raise CacheReplyError(f"{name} answered {line[:80]!r}, not the Redis protocol")


def _reason(exc: Exception) -> str:
    if isinstance(exc, CacheReplyError):
        return exc.message
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own text names the call, not the cause
    return str(exc) or type(exc).__name__


def parse_info(text: str) -> dict[str, str]:
    """INFO's `key:value` lines (sections and comments skipped)."""
    pairs = (line.split(":", 1) for line in text.splitlines()
             if ":" in line and not line.startswith("#"))
    return {key: value.strip() for key, value in pairs}
