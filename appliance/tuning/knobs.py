"""Knobs: one setting of the host each, with its path, read, desired value, normalize, write,
verify and revert.

`read` gives the raw text (what the journal keeps, so a rollback writes back exactly what was
there); `current` is that text normalized into the form `desired` is written in, so
"00000000,00000003", "0-1" and "0,1" all compare equal as CPU sets.
"""

from __future__ import annotations

import errno
import subprocess
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from appliance import cpulist
from appliance.errors import AdpopError
from appliance.tuning.host import Host

# What the kernel answers when it keeps an IRQ's affinity to itself (managed IRQs, per-CPU
# interrupts, chips without affinity support).
KERNEL_OWNED = (errno.EIO, errno.EPERM, errno.EINVAL, errno.ENOSPC)


class KnobError(AdpopError):
    """A write the kernel refused."""


class Status(str, Enum):
    OK = "ok"
    DRIFT = "drift"
    ABSENT = "absent"  # the host has no such setting: nothing to do
    KERNEL_OWNED = "kernel-owned"  # the kernel refuses to let it be set: reported, not failed
    SHORT = "short"  # hugepages: fewer than asked for
    # An IRQ set as desired that the kernel moves at its next interrupt (x86 moves MSI
    # vectors lazily); not drift, nothing to repair.
    PENDING = "pending"


# The statuses of knobs an apply would change: what verify fails on and drift repairs.
NOT_AS_DESIRED = frozenset({Status.DRIFT.value, Status.SHORT.value})


@dataclass
class Knob:
    name: str  # stable id, also the journal's key
    group: str  # hugepages, irq, rps, xps, queues, sysctl, cpu, thp, irqbalance
    path: Path
    desired: str
    why: str = ""
    refused: bool = field(default=False, init=False)  # the kernel refused the last write

    def read(self) -> str | None:
        """The file as it is, byte for byte (the journal writes it back so)."""
        try:
            return self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def normalize(self, raw: str) -> str:
        return " ".join(raw.split())

    def current(self) -> str | None:
        raw = self.read()
        return None if raw is None else self.normalize(raw)

    def write(self, value: str) -> None:
        try:
            with open(self.path, "w") as out:
                out.write(value)
        except OSError as exc:
            self.refused = exc.errno in KERNEL_OWNED
            raise KnobError(f"{self.path}: {exc.strerror}") from exc

    def apply(self) -> None:
        self.write(self.desired)

    def verify(self) -> Status:
        now = self.current()
        if now is None:
            return Status.ABSENT
        if now == self.desired:
            return Status.OK
        return Status.KERNEL_OWNED if self.refused else Status.DRIFT

    def revert(self, original: str | None) -> None:
        if original is not None:
            self.write(original)


@dataclass
class CpuListKnob(Knob):
    """A CPU list file (smp_affinity_list); verified against `effective` when the kernel
    tells where the IRQ really goes."""

    effective: Path | None = None

    def normalize(self, raw: str) -> str:
        return cpulist.render(cpulist.parse(raw))

    def verify(self) -> Status:
        status = super().verify()
        if status is Status.OK and self.effective is not None and self.effective.exists():
            actual = cpulist.parse(self.effective.read_text())
            if actual and not actual <= cpulist.parse(self.desired):
                return Status.PENDING
        return status


def mask_to_cpus(text: str) -> frozenset[int]:
    value = int(text.replace(",", "").strip() or "0", 16)
    return frozenset(bit for bit in range(value.bit_length()) if value >> bit & 1)


def cpus_to_mask(cpus: frozenset[int]) -> str:
    """The kernel's hex mask: 32-bit groups joined by commas, as it prints them."""
    value = sum(1 << cpu for cpu in cpus)
    groups = max(1, (max(cpus, default=0) // 32) + 1)
    words = [(value >> (32 * i)) & 0xFFFFFFFF for i in reversed(range(groups))]
    return ",".join(f"{w:08x}" for w in words)


class MaskKnob(Knob):
    """A hex CPU mask file (rps_cpus, xps_cpus, default_smp_affinity); shown and compared
    as a CPU list, written as a mask."""

    def normalize(self, raw: str) -> str:
        return cpulist.render(mask_to_cpus(raw))

    def apply(self) -> None:
        self.write(cpus_to_mask(cpulist.parse(self.desired)))


class ChoiceKnob(Knob):
    """A file listing choices with the active one bracketed ("always [madvise] never")."""

    def normalize(self, raw: str) -> str:
        for word in raw.split():
            if word.startswith("[") and word.endswith("]"):
                return word[1:-1]
        return raw.strip()

    def revert(self, original: str | None) -> None:
        if original is not None:
            self.write(self.normalize(original))  # the kernel takes one choice, not the list


@dataclass
class HugepagesKnob(Knob):
    """nr_hugepages of one node and size: written, read back, and after a shortfall written
    once more after compacting memory."""

    compact: Path | None = None
    shortfall: int = field(default=0, init=False)

    def apply(self) -> None:
        if not self.needed():
            return
        want = int(self.desired)
        self.write(self.desired)
        got = int(self.current() or 0)
        if got < want and self.compact is not None and self.compact.exists():
            self.compact.write_text("1")
            self.write(self.desired)
            got = int(self.current() or 0)
        self.shortfall = max(0, want - got)

    def needed(self) -> bool:
        # More than asked for (pages reserved at boot, say) is fine: never shrink them.
        return int(self.current() or 0) < int(self.desired)

    def verify(self) -> Status:
        if self.current() is None:
            return Status.ABSENT
        if not self.needed():
            return Status.OK
        return Status.SHORT if self.shortfall else Status.DRIFT


@dataclass
class ChannelsKnob(Knob):
    """A NIC's combined queue count, through ethtool's channels ioctl."""

    host: Host = field(default_factory=Host)
    nic: str = ""

    def read(self) -> str | None:
        count = self.host.channels(self.nic).get("combined")
        return None if count is None else str(count)

    def write(self, value: str) -> None:
        try:
            self.host.set_channels(self.nic, int(value))
        except OSError as exc:
            self.refused = exc.errno in (errno.EOPNOTSUPP, errno.EINVAL)
            raise KnobError(f"{self.nic} channels: {exc.strerror}") from exc


@dataclass
class MountKnob(Knob):
    """A hugetlbfs mount: "mounted" or "absent". Only the real host is mounted on."""

    host: Host = field(default_factory=Host)
    target: str = "/dev/hugepages"  # as /proc/mounts names it (self.path is under the root)
    fstype: str = "hugetlbfs"
    options: str = ""
    dir_existed: bool = True  # the mount point was there before adpop mounted on it

    def read(self) -> str:
        return "mounted" if self.host.mounted(self.fstype, self.target) else "absent"

    def write(self, value: str) -> None:
        if value == "mounted":
            self.path.mkdir(parents=True, exist_ok=True)
        if not self.host.real:
            self._write_fake_mounts(value == "mounted")
            return
        argv = (["mount", "-t", self.fstype, "-o", self.options, "hugetlbfs", str(self.path)]
                if value == "mounted" else ["umount", str(self.path)])
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode:
            raise KnobError(f"{' '.join(argv)}: {result.stderr.strip()}")
        if value != "mounted" and not self.dir_existed:
            self.path.rmdir()  # leave the host as adpop found it


    def _write_fake_mounts(self, mount: bool) -> None:
        # A fake tree's mounts are its proc/mounts file: the line is added or taken out.
        table = self.host.path("/proc/mounts")
        lines = [line for line in table.read_text().splitlines()
                 if line.split()[1:3] != [self.target, self.fstype]]
        if mount:
            lines.append(f"hugetlbfs {self.target} {self.fstype} rw,{self.options} 0 0")
        table.write_text("\n".join(lines) + "\n")


@dataclass
class FileKnob(Knob):
    """A whole file adpop owns (irqbalance's drop-in): absent originally means deleted on
    revert."""

    def write(self, value: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().write(value)

    def normalize(self, raw: str) -> str:
        return raw.strip()

    def verify(self) -> Status:
        now = self.current()
        return Status.OK if now == self.desired.strip() else Status.DRIFT

    def revert(self, original: str | None) -> None:
        if original is None:
            self.path.unlink(missing_ok=True)
        else:
            self.write(original)
