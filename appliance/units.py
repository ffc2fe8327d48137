"""The systemd generator: unit settings that come from the configuration, not the unit files.

systemd runs generators at boot and on every daemon-reload, before it loads units; ours
(units/adpop-generator, calling `adpop units generate`) reads /etc/adpop and writes drop-ins
into the generator's normal directory:

- adpop-engine.service: CPUAffinity = engine.cpus, so even the engine's start-up runs on its
  own CPUs.
- dragonfly.service and adpop-redis.service: CPUAffinity = the housekeeping CPUs
  (tuning.housekeeping_cpus, else every CPU the engine does not have, else all of them) and
  MemoryMax a quarter above cache.memory, so the server evicts at its maxmemory long before
  the kernel kills it.

A bad configuration must not stop the boot: the generator then writes nothing, says why on
stderr (the journal) and the units run with their own defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance import cpulist

ENGINE_UNIT = "adpop-engine.service"
CACHE_UNITS = ("dragonfly.service", "adpop-redis.service")
DROP_IN = "50-adpop-generated.conf"
MEMORY_HEADROOM = 1.25


def drop_ins(appliance: Any, online: frozenset[int]) -> dict[str, str]:
    """Unit name → drop-in text, from the configuration and the online CPUs."""
    header = "# Written by adpop-generator from /etc/adpop; edit the configuration, not this.\n"
    engine_cpus = cpulist.parse(appliance.engine.cpus) & online
    # The same housekeeping set the tuning steers IRQs to: tuning.housekeeping_cpus when set.
    housekeeping = (cpulist.parse(appliance.tuning.housekeeping_cpus) & online
                    or (online - engine_cpus) or online)
    out: dict[str, str] = {}
    if engine_cpus:
        out[ENGINE_UNIT] = f"{header}[Service]\nCPUAffinity={cpulist.render(engine_cpus)}\n"
    cache = (f"{header}[Service]\nCPUAffinity={cpulist.render(housekeeping)}\n"
             f"MemoryMax={int(appliance.cache.memory * MEMORY_HEADROOM)}\n")
    for unit in CACHE_UNITS:
        out[unit] = cache
    return out


def write(normal_dir: Path, units: dict[str, str]) -> list[Path]:
    written = []
    for unit, text in units.items():
        folder = normal_dir / f"{unit}.d"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / DROP_IN
        path.write_text(text)
        written.append(path)
    return written
