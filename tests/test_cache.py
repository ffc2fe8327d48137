"""The supervisor's cache probe: PING and INFO in the Redis protocol, against a real
redis-server and against servers that answer wrongly or not at all."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from appliance import cache
from appliance.up import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def password(tmp_path: Path) -> str:
    return cache.write_secrets(tmp_path / "secrets" / "cache.password")


@pytest.fixture
def redis_port(tmp_path: Path, password: str) -> Iterator[int]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server missing: `make setup` installs it"
    port = free_port()
    argv = cache.redis_argv(binary, f"127.0.0.1:{port}", 32 << 20, tmp_path,
                            tmp_path / "secrets")
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not asyncio.run(cache.probe(f"127.0.0.1:{port}", password)).ok:
            assert process.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_probe_reads_a_real_redis(redis_port: int, password: str) -> None:
    health = asyncio.run(cache.probe(f"127.0.0.1:{redis_port}", password))
    assert health.ok and health.reason == ""
    assert health.max_memory == 32 << 20 and 0 < health.used_memory < health.max_memory
    assert health.connected_clients >= 1 and health.evicted_keys == 0 and health.ping_ms > 0


def test_the_cache_refuses_a_client_without_its_password(redis_port: int, tmp_path: Path,
                                                         password: str) -> None:
    """Case 8: the cache accepted any local user. The password lives in 0600 files, never
    on the server's command line (any local user reads /proc/PID/cmdline)."""
    health = asyncio.run(cache.probe(f"127.0.0.1:{redis_port}"))
    assert not health.ok and "NOAUTH" in health.reason, health.reason
    wrong = asyncio.run(cache.probe(f"127.0.0.1:{redis_port}", "not-the-password"))
    assert not wrong.ok and "AUTH refused" in wrong.reason
    assert "not-the-password" not in wrong.reason
    folder = tmp_path / "secrets"
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert folder.stat().st_mode & 0o777 == 0o700
    for pid in Path("/proc").iterdir():
        if pid.name.isdigit():
            try:
                assert password.encode() not in (pid / "cmdline").read_bytes()
            except OSError:
                continue
    # Made once: a second start keeps it.
    assert cache.write_secrets(folder / "cache.password") == password


def test_probe_of_nothing_listening_says_so() -> None:
    health = asyncio.run(cache.probe(f"127.0.0.1:{free_port()}"))
    assert not health.ok
    assert health.reason.endswith("not answering: Connection refused"), health.reason


async def with_server(answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]) -> cache.CacheHealth:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await cache.probe(f"127.0.0.1:{port}")


@pytest.mark.parametrize("reply, reason", [
    (b"-NOAUTH Authentication required.\r\n", "PING refused: NOAUTH Authentication required."),
    (b"HTTP/1.1 400 Bad Request\r\n", "not the Redis protocol"),
    (b"+PONG\r\n$10\r\nshort", "not answering"),  # INFO's body cut short
    (b"", "not answering"),  # hangs up at once
])
def test_probe_names_a_wrong_answer(reply: bytes, reason: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(reply)
        await writer.drain()
        writer.close()

    health = asyncio.run(with_server(answer))
    assert not health.ok and reason in health.reason, health.reason


def test_probe_of_a_silent_server_times_out() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(cache.PING_TIMEOUT * 3)
        writer.close()

    health = asyncio.run(with_server(answer))
    assert not health.ok and "not answering within" in health.reason


def test_probe_warns_near_the_memory_limit() -> None:
    info = "# Memory\r\nused_memory:95\r\nmaxmemory:100\r\nevicted_keys:7\r\n"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"PING\r\n")
        writer.write(b"+PONG\r\n")
        await reader.readuntil(b"INFO\r\n")
        writer.write(b"$%d\r\n%s\r\n" % (len(info), info.encode()))
        await writer.drain()
        writer.close()

    health = asyncio.run(with_server(answer))
    assert health.ok and health.reason == "memory 95% of its limit" and health.evicted_keys == 7
