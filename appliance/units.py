"""The systemd generator: unit settings that come from the configuration, not the unit files.

systemd runs generators at boot and on every daemon-reload, before it loads units; ours
(units/adpop-generator, calling `adpop units generate`) reads /etc/adpop and writes drop-ins
into the generator's normal directory:

- adpop-engine.service: CPUAffinity = engine.cpus, so even the engine's start-up runs on its
  own CPUs, and ExecStart = the engine's command line from the configuration.
- dragonfly.service and adpop-redis.service: CPUAffinity = the housekeeping CPUs
  (tuning.housekeeping_cpus, else every CPU the engine does not have, else all of them),
  MemoryMax a quarter above cache.memory, so the server evicts at its maxmemory long before
  the kernel kills it, and ExecStart = the server's command line (its password file from
  the unit's credentials, `%d`).

The ExecStart lines run the servers straight from systemd. The units' own ExecStart (`adpop
engine run`, `adpop cache run`) would compute the same command line at every start, but
through a Python process: a second or more of an emulated boot's critical path.

A bad configuration must not stop the boot: the generator then writes nothing, says why on
stderr (the journal) and the units run with their own defaults (the `adpop ... run` commands,
which then name the problem). A configuration edited since the last daemon-reload leaves the
drop-ins stale; the supervisor compares them at its start (stale()) and reloads.
"""

from __future__ import annotations

from pathlib import Path

from appliance import cache, cpulist
from appliance.config import ApplianceConfig
from appliance.parts import CACHE_PASSWORD_CREDENTIAL, engine_argv, state_path

ENGINE_UNIT = "adpop-engine.service"
# Cache unit → (server, binary), as each unit's own ExecStart names them.
CACHE_UNITS = {"dragonfly.service": ("dragonfly", "/usr/bin/dragonfly"),
               "adpop-redis.service": ("redis", "/usr/bin/redis-server")}
# The cache units' StateDirectory=adpop-cache.
CACHE_STATE_DIR = Path("/var/lib/adpop-cache")
DROP_IN = "50-adpop-generated.conf"
GENERATOR_DIR = Path("/run/systemd/generator")  # the normal directory systemd gives ours
MEMORY_HEADROOM = 1.25


def quote(arg: str) -> str:
    """One ExecStart argument, as systemd reads it back: quoted, with its escapes, and with
    specifiers (%) and variable references ($) made literal -- but for cache.CREDENTIALS,
    which becomes `%d`, the unit's credentials directory."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("%", "%%").replace("$", "$$")
    return '"' + escaped.replace(cache.CREDENTIALS, "%d") + '"'


def exec_start(argv: list[str]) -> str:
    # The empty assignment clears the unit's own ExecStart (a service has one).
    return "ExecStart=\nExecStart=" + " ".join(quote(arg) for arg in argv) + "\n"


def drop_ins(appliance: ApplianceConfig, online: frozenset[int]) -> dict[str, str]:
    """Unit name → drop-in text, from the configuration and the online CPUs."""
    header = "# Written by adpop-generator from /etc/adpop; edit the configuration, not this.\n"
    engine_cpus = cpulist.parse(appliance.engine.cpus) & online
    # The same housekeeping set the tuning steers IRQs to: tuning.housekeeping_cpus when set.
    housekeeping = (cpulist.parse(appliance.tuning.housekeeping_cpus) & online
                    or (online - engine_cpus) or online)
    affinity = f"CPUAffinity={cpulist.render(engine_cpus)}\n" if engine_cpus else ""
    password = state_path(appliance, appliance.cache.password_file)
    credential = f"LoadCredential={CACHE_PASSWORD_CREDENTIAL}:{password}\n"
    out = {ENGINE_UNIT: f"{header}[Service]\n{affinity}{credential}"
                        f"{exec_start(engine_argv(appliance, cache.CREDENTIALS))}"}
    for unit, (server, binary) in CACHE_UNITS.items():
        argv = cache.server_argv(server, binary, appliance.cache, CACHE_STATE_DIR,
                                 len(housekeeping), cache.CREDENTIALS)
        out[unit] = (f"{header}[Service]\nCPUAffinity={cpulist.render(housekeeping)}\n"
                     f"MemoryMax={int(appliance.cache.memory * MEMORY_HEADROOM)}\n"
                     f"{exec_start(argv)}")
    return out


def stale(units: dict[str, str], normal_dir: Path | None = None) -> list[str]:
    """The units whose generated drop-in (in normal_dir, else GENERATOR_DIR) differs from
    `units`, what the configuration gives now: it changed after systemd ran the generator."""
    folder = normal_dir or GENERATOR_DIR

    def written(unit: str) -> str | None:
        try:
            return (folder / f"{unit}.d" / DROP_IN).read_text()
        except OSError:
            return None
    return [unit for unit, text in units.items() if written(unit) != text]


def write(normal_dir: Path, units: dict[str, str]) -> list[Path]:
    written = []
    for unit, text in units.items():
        folder = normal_dir / f"{unit}.d"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / DROP_IN
        path.write_text(text)
        written.append(path)
    return written
