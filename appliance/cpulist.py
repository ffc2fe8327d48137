"""CPU lists in the kernel's notation ("0-3,8,10-11"), as sysfs, systemd and the engine use."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from appliance.errors import AdpopError

SYS_CPU = Path("/sys/devices/system/cpu")


class CpuListError(AdpopError):
    """A CPU list that does not parse."""


def parse(text: str) -> frozenset[int]:
    """The CPUs of `text`; raises CpuListError naming the bad part."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.strip().split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise CpuListError(f"CPU list {text!r}: {part!r} is not N or N-M",
                               hint='write CPUs like "2-5" or "0,2,4"')
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise CpuListError(f"CPU list {text!r}: range {part!r} runs backwards",
                               hint="write the lower CPU first")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def render(cpus: Iterable[int]) -> str:
    """The shortest kernel-notation list of `cpus` ("" when empty)."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    parts = [str(low) if low == high else f"{low}-{high}" for low, high in runs]
    return ",".join(parts)


def online(root: Path = SYS_CPU) -> frozenset[int]:
    """The CPUs the kernel has online."""
    return parse((root / "online").read_text())
