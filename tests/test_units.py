"""The appliance's systemd units: they verify, they are hardened, and they agree with the code.

`systemd-analyze verify` checks that each ExecStart= binary exists, so it runs in a private
mount namespace whose /usr is an overlay holding what the image installs there: the built
engine, an `adpop` entry point running this checkout, and the generator's drop-ins. No
Dragonfly build is reachable from this machine, so /usr/bin/dragonfly is a stand-in there.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shlex
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from appliance import cache, cpulist, units
from appliance.config import Scope, load
from appliance.parts import APPLIANCE_ENGINE_SOCKET, engine_argv
from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.model import CampaignSet
from appliance.snapshot.store import SnapshotStore
from appliance.up import free_port
from tests.engine_harness import ENGINE, install

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "units"
UNIT_FILES = sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".target"))
SECURITY_LIMITS = {"adpop-engine.service": 2.0, "adpop-supervisor.service": 5.0}
SECURITY_DEFAULT = 5.0  # every other unit is hardened too


def adpop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def verify_in_image_usr(tmp_path: Path, unit_files: list[Path],
                        drop_ins: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify unit_files` with /usr and /etc as the image lays them out:
    the shipped default config plus a drop-in pinning the engine, and the generator run over
    it (into /usr/lib/systemd/system, a directory verify reads) unless `drop_ins` is given."""
    script = "set -e\n"
    for top in ("usr", "etc"):
        (tmp_path / top / "upper").mkdir(parents=True)
        (tmp_path / top / "work").mkdir()
        script += (f"mount -t overlay overlay -o lowerdir=/{top},upperdir={tmp_path / top}/upper"
                   f",workdir={tmp_path / top}/work /{top}\n")
    entry = f'#!/bin/sh\ncd {REPO} && exec {sys.executable} -m appliance.cli "$@"\n'
    pin = f'[engine]\ncpus = "{max(cpulist.online())}"\n'
    script += f"""install -D -m 0755 {ENGINE} /usr/lib/adpop/adpop-engine
mkdir -p /usr/lib/adpop/venv/bin /etc/adpop/appliance.d
printf '%s' '{entry}' > /usr/lib/adpop/venv/bin/adpop
chmod 0755 /usr/lib/adpop/venv/bin/adpop
printf '#!/bin/sh\\nexit 1\\n' > /usr/bin/dragonfly
chmod 0755 /usr/bin/dragonfly
cp {REPO}/config/appliance.toml /etc/adpop/appliance.toml
printf '%s' '{pin}' > /etc/adpop/appliance.d/10-pin.toml
"""
    if drop_ins is None:
        script += f"{UNITS}/generators/adpop-generator /usr/lib/systemd/system /tmp /tmp\n"
    else:
        for unit, text in drop_ins.items():
            folder = f"/usr/lib/systemd/system/{unit}.d"
            script += f"mkdir -p {folder}\ncat > {folder}/{units.DROP_IN} <<'EOF'\n{text}EOF\n"
    script += ("cat /usr/lib/systemd/system/adpop-engine.service.d/*.conf\n"
               "exec systemd-analyze verify " + " ".join(str(p) for p in unit_files) + "\n")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120, check=False)


def test_units_verify_with_the_generators_drop_ins(tmp_path: Path) -> None:
    result = verify_in_image_usr(tmp_path, UNIT_FILES)
    # verify exits 0 on unknown keys and bad values, so its warnings count too.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert f"CPUAffinity={max(cpulist.online())}" in result.stdout


def test_verify_harness_sees_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "units" / "adpop-engine.service"
    broken.parent.mkdir()
    broken.write_text((UNITS / "adpop-engine.service").read_text()
                      .replace("LimitMEMLOCK=infinity", "LimitMEMLOK=infinity"))
    result = verify_in_image_usr(tmp_path, [broken],
                                 {"adpop-engine.service": "[Service]\nCPUAffinity=zz\n"})
    assert "LimitMEMLOK" in result.stderr and "CPU affinity" in result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("unit", [p for p in UNIT_FILES if p.suffix == ".service"],
                         ids=lambda p: p.name)
def test_service_exposure(unit: Path) -> None:
    limit = SECURITY_LIMITS.get(unit.name, SECURITY_DEFAULT)
    assert exposure(unit) <= limit


def unit_config(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_state_directories_are_not_shared_between_owners() -> None:
    """systemd chowns a StateDirectory= tree, recursively, to the owner of the unit that
    starts last: two units with different owners on one directory take turns owning it and
    everything under it (the snapshots left group adpop, and the engine could not read
    them)."""
    owners: dict[str, tuple[str, str, str]] = {}
    for unit in sorted(UNITS.glob("*.service")):
        service = unit_config(unit.name)["Service"]
        owner = (service.get("User", "root"), service.get("Group", ""),
                 service.get("DynamicUser", "no"))
        for directory in service.get("StateDirectory", "").split():
            assert owners.setdefault(directory, owner) == owner, \
                f"{unit.name}: StateDirectory={directory} has another owner in another unit"


def test_units_agree_with_the_configuration() -> None:
    """The paths the units create are the ones the code and the default config use."""
    appliance = load(Scope.APPLIANCE, None)
    engine = unit_config("adpop-engine.service")
    supervisor = unit_config("adpop-supervisor.service")
    state = Path(appliance.paths.state_dir)
    assert engine["Unit"]["ConditionPathExists"] == str(state / "current")
    engine_run = Path("/run", engine["Service"]["RuntimeDirectory"])
    assert engine_run == Path(APPLIANCE_ENGINE_SOCKET).parent
    assert Path("/var/lib", supervisor["Service"]["StateDirectory"]) == state
    engine_state = Path("/var/lib", engine["Service"]["StateDirectory"])
    for path in (appliance.engine.token_key, appliance.engine.spool):
        assert (state / path).parent == engine_state or state / path == engine_state
    assert Path("/run", supervisor["Service"]["RuntimeDirectory"]) == \
        Path(appliance.supervisor.control_socket).parent
    assert appliance.engine.unit == "adpop-engine.service"
    users = (UNITS / "sysusers.d" / "adpop.conf").read_text()
    assert f"g {appliance.supervisor.operator_group} " in users
    assert f"u {engine['Service']['User']} -:{engine['Service']['Group']} " in users
    assert supervisor["Service"]["Group"] == engine["Service"]["Group"]
    assert supervisor["Service"]["Type"] == "notify" and supervisor["Service"]["WatchdogSec"]
    assert supervisor["Service"]["Restart"] == "always"
    # Descriptors have an explicit ceiling.
    assert int(supervisor["Service"]["LimitNOFILE"]) >= 4096


@pytest.mark.parametrize("unit", [p for p in UNIT_FILES if p.suffix == ".service"],
                         ids=lambda p: p.name)
def test_every_service_states_its_descriptor_limit(unit: Path) -> None:
    """Issue 20, case 5: no unit lives on the default 1,024 by accident; each says what it
    needs (the engine and the cache hold a connection each per client)."""
    assert int(unit_config(unit.name)["Service"]["LimitNOFILE"]) >= 1024


def test_the_xdp_unit_mounts_bpffs_once_when_nothing_has() -> None:
    """The unit's ExecStartPre (outside the sandbox, "+") run as written, in a private mount
    namespace: with bpffs unmounted it mounts it; run again, it mounts nothing over it."""
    pre = unit_config("adpop-xdp.service")["Service"]["ExecStartPre"]
    assert pre.startswith("+/bin/sh -c '") and pre.endswith("'")
    line = pre.removeprefix("+/bin/sh -c '").removesuffix("'")
    count = "grep -c ' /sys/fs/bpf .* - bpf ' /proc/self/mountinfo"
    script = (f"while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf; done; {count}; "
              f"sh -c '{line}' && {count} && sh -c '{line}' && {count}")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.split() == ["0", "1", "1"], result.stdout + result.stderr


def test_sysusers_and_tmpfiles_apply_to_a_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                    str(UNITS / "sysusers.d" / "adpop.conf")], check=True, timeout=60)
    passwd = (tmp_path / "etc" / "passwd").read_text()
    groups = {line.split(":")[0]: line.split(":")[2]
              for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    engine_line = next(line for line in passwd.splitlines() if line.startswith("adpop-engine:"))
    assert engine_line.split(":")[3] == groups["adpop"] and "adpop-ops" in groups
    assert engine_line.endswith("/usr/sbin/nologin")
    result = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}",
                             str(UNITS / "tmpfiles.d" / "adpop.conf")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    bpf = tmp_path / "sys" / "fs" / "bpf" / "adpop"
    assert stat.S_IMODE(bpf.stat().st_mode) == 0o700
    assert (tmp_path / "etc" / "adpop" / "appliance.d").is_dir()


def test_sysctl_keys_exist_on_this_kernel() -> None:
    for line in (UNITS / "sysctl.d" / "50-adpop.conf").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        assert Path("/proc/sys", *key.split(".")).exists(), key
        assert value.lstrip("-").isdigit(), line


def test_generator_writes_pinning_and_memory(tmp_path: Path) -> None:
    online = cpulist.online()
    config = tmp_path / "appliance.toml"
    engine_cpu = max(online)
    config.write_text(f'[engine]\ncpus = "{engine_cpu}"\n[cache]\nmemory = "64MiB"\n')
    out = tmp_path / "gen"
    result = adpop("units", "generate", str(out), "--config", str(config))
    assert result.returncode == 0, result.stderr
    engine = (out / "adpop-engine.service.d" / units.DROP_IN).read_text()
    assert f"CPUAffinity={engine_cpu}\n" in engine
    housekeeping = cpulist.render(online - {engine_cpu} or online)
    for unit in units.CACHE_UNITS:
        text = (out / f"{unit}.d" / units.DROP_IN).read_text()
        assert f"CPUAffinity={housekeeping}\n" in text
        assert f"MemoryMax={64 * 1024 * 1024 * 5 // 4}\n" in text


def test_cache_affinity_follows_the_housekeeping_cpus(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[engine]\ncpus = "4-7"\n[tuning]\nhousekeeping_cpus = "0-1"\n')
    appliance = load(Scope.APPLIANCE, config)
    written = units.drop_ins(appliance, frozenset(range(8)))
    assert "CPUAffinity=4-7\n" in written[units.ENGINE_UNIT]
    for unit in units.CACHE_UNITS:  # not 0-3: CPUs 2-3 are left to neither
        assert "CPUAffinity=0-1\n" in written[unit]


def exec_start_argv(drop_in: str) -> list[str]:
    """The argv of a drop-in's last ExecStart=, read back as systemd does for our quoting
    (shlex for the quotes and backslashes; doubled % and $ are single)."""
    lines = [line for line in drop_in.splitlines() if line.startswith("ExecStart=")]
    assert lines[0] == "ExecStart=", "the unit's own ExecStart must be cleared first"
    return [arg.replace("%%", "%").replace("$$", "$")
            for arg in shlex.split(lines[-1].removeprefix("ExecStart="))]


def test_generator_writes_the_servers_command_lines(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[engine]\ncpus = "1"\nlisten = "0.0.0.0:8080"\n'
                      '[cache]\nmemory = "64MiB"\naddress = "127.0.0.1:6390"\n'
                      '[supervisor]\nmode = "appliance"\n')
    appliance = load(Scope.APPLIANCE, config)
    written = units.drop_ins(appliance, frozenset(range(4)))
    # The command lines `adpop engine run` and `adpop cache run` would exec under systemd.
    assert exec_start_argv(written[units.ENGINE_UNIT]) == engine_argv(appliance, "%d")
    # The cache password reaches the engine's sandboxed user as a credential.
    assert "LoadCredential=cache.password:" in written[units.ENGINE_UNIT]
    assert "--admin" in engine_argv(appliance) and APPLIANCE_ENGINE_SOCKET in engine_argv(appliance)
    redis = exec_start_argv(written["adpop-redis.service"])
    assert redis == cache.redis_argv("/usr/bin/redis-server", "127.0.0.1:6390", 64 << 20,
                                     units.CACHE_STATE_DIR, "%d")
    assert redis[1] == "%d/cache.redis.conf"  # the password, from the unit's credentials
    assert redis[-2:] == ["--logfile", ""]  # an empty argument survives the quoting
    dragonfly = exec_start_argv(written["dragonfly.service"])
    assert "--proactor_threads=3" in dragonfly  # one per housekeeping CPU: 0, 2, 3
    assert "--snapshot_cron=*/5 * * * *" in dragonfly


def test_engine_uses_the_huge_pages_the_tuning_reserves(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    assert "--hugepages" in engine_argv(load(Scope.APPLIANCE, None))
    config.write_text('[tuning]\nhugepages_per_shard = "0"\n')
    assert "--hugepages" not in engine_argv(load(Scope.APPLIANCE, config))


@pytest.mark.parametrize("server", ["adpop-redis.service", "dragonfly.service"])
def test_generated_cache_command_matches_the_unit(server: str) -> None:
    # The unit's own ExecStart (`adpop cache run --binary B`) and the drop-in name one binary,
    # and the unit's StateDirectory is the folder the drop-in gives the server.
    text = (UNITS / server).read_text()
    binary = units.CACHE_UNITS[server][1]
    assert f"--binary {binary} " in text
    assert f"StateDirectory={units.CACHE_STATE_DIR.name}\n" in text


def test_quoting_keeps_specifiers_and_variables_literal() -> None:
    assert units.quote('50% of $HOME "x" \\') == '"50%% of $$HOME \\"x\\" \\\\"'
    assert shlex.split(units.quote("a b")) == ["a b"]


def test_stale_drop_ins_are_found(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[cache]\nmemory = "64MiB"\n')
    online = frozenset(range(2))
    generated = tmp_path / "generator"
    units.write(generated, units.drop_ins(load(Scope.APPLIANCE, config), online))
    assert units.stale(units.drop_ins(load(Scope.APPLIANCE, config), online), generated) == []
    config.write_text('[cache]\nmemory = "128MiB"\n')
    edited = units.drop_ins(load(Scope.APPLIANCE, config), online)
    assert units.stale(edited, generated) == list(units.CACHE_UNITS)
    assert units.stale(edited, tmp_path / "none") == list(edited)


def test_supervisor_reloads_systemd_when_the_drop_ins_are_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.supervisor import core

    config = tmp_path / "appliance.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                      '[supervisor]\nmode = "appliance"\n')
    appliance = load(Scope.APPLIANCE, config)
    calls: list[tuple[str, ...]] = []

    async def systemctl(*args: str) -> tuple[int, str]:
        calls.append(args)
        return 0, ""

    generated = tmp_path / "generator"
    monkeypatch.setattr(units, "GENERATOR_DIR", generated)
    monkeypatch.setattr(core, "systemctl", systemctl)
    supervisor = core.Supervisor(appliance, SnapshotStore(tmp_path / "state", keep=3),
                                 components=[])
    # What the generator writes at boot, from the configuration as loaded.
    units.write(generated, units.drop_ins(appliance, cpulist.online()))
    asyncio.run(supervisor.reload_stale_units())
    assert calls == []  # as generated: nothing to do
    (generated / f"{units.ENGINE_UNIT}.d" / units.DROP_IN).write_text("# older\n")
    asyncio.run(supervisor.reload_stale_units())
    assert calls == [("daemon-reload",)]


def test_generator_with_a_bad_config_writes_nothing_and_boots_on(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[engine]\ncpus = "3-1"\n')
    out = tmp_path / "gen"
    result = adpop("units", "generate", str(out), "--config", str(config))
    assert result.returncode == 0
    assert "no drop-ins written" in result.stderr and "runs backwards" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_engine_run_without_a_snapshot_is_one_line(tmp_path: Path) -> None:
    result = adpop("engine", "run", "--state", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no active snapshot" in result.stderr


def test_engine_run_execs_the_engine(tmp_path: Path, sample_set: CampaignSet,
                                     signing_key: SigningKey) -> None:
    state = tmp_path / "state"
    install(SnapshotStore(state, keep=3), sample_set, 1, signing_key)
    port = free_port()
    config = tmp_path / "appliance.toml"
    config.write_text(f'[paths]\nstate_dir = "{state}"\n[engine]\nbinary = "{ENGINE}"\n'
                      f'listen = "127.0.0.1:{port}"\nadmin_socket = "engine.sock"\n')
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "engine", "run",
                                "--config", str(config)], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        # exec, not a child: systemd's main PID is the engine itself.
        assert os.readlink(f"/proc/{process.pid}/exe") == str(ENGINE.resolve())
        key = state / appliance_default("token_key")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
        assert (state / appliance_default("spool")).is_dir()
    finally:
        process.terminate()
        process.wait(timeout=15)


def appliance_default(name: str) -> str:
    value: str = getattr(load(Scope.APPLIANCE, None).engine, name)
    return value


def test_cache_run_execs_redis(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "appliance.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n'
                      f'[cache]\naddress = "127.0.0.1:{port}"\nmemory = "32MiB"\n')
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "cache", "run",
                                "--server", "redis", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        import redis

        password_file = tmp_path / "secrets" / "cache.password"
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                # Made by `adpop cache run` when missing, 0600; the server requires it.
                client = redis.Redis(port=port, socket_timeout=2,
                                     password=password_file.read_text().strip())
                assert client.config_get("maxmemory")["maxmemory"] == str(32 * 1024 * 1024)
                break
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.1)
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert Path(os.readlink(f"/proc/{process.pid}/exe")).name.startswith("redis")
        assert client.config_get("dir")["dir"] == str(tmp_path / "cache")
    finally:
        process.terminate()
        process.wait(timeout=15)
