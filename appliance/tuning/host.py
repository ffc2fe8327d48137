"""What the host has: CPUs, NUMA nodes, NICs with their queues and IRQs, irqbalance.

Every path goes through Host.path(), so `--root DIR` points all of them at a fake tree (the
tests' virtio, mlx5-style and bonded hosts). Reading is all this module does; writing is the
knobs' business.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from appliance import cpulist
from appliance.errors import AdpopError

# Queue numbers from IRQ names, per driver family. Anything else a NIC owns (config, async,
# mailbox IRQs) goes to the housekeeping CPUs.
QUEUE_NAMES = (
    re.compile(r"^virtio\d+-(?:input|output)\.(\d+)$"),  # virtio_net: one pair per queue
    re.compile(r"^mlx[45]_comp(\d+)@"),  # mlx4 / mlx5 completion vectors
    re.compile(r"-(?:TxRx|txrx|rxtx|fp|rx|tx|comp)-(\d+)$"),  # i40e, ice, ixgbe, bnxt, ena...
)

# ETHTOOL_GCHANNELS / ETHTOOL_SCHANNELS through SIOCETHTOOL (linux/ethtool.h).
SIOCETHTOOL = 0x8946
ETHTOOL_GCHANNELS, ETHTOOL_SCHANNELS = 0x3C, 0x3D
CHANNELS = struct.Struct("9I")  # cmd, max rx/tx/other/combined, rx/tx/other/combined counts


class HostError(AdpopError):
    """The host (or the tree standing for it) lacks something tuning needs."""


@dataclass(frozen=True)
class Irq:
    number: int
    name: str
    queue: int | None  # the queue it serves, None for the NIC's other IRQs


@dataclass(frozen=True)
class Nic:
    name: str
    node: int | None  # NUMA node of its device, None when the firmware does not say
    local_cpus: frozenset[int]
    irqs: tuple[Irq, ...]
    rx_queues: int
    tx_queues: int
    channels: dict[str, int] = field(default_factory=dict)  # ethtool's, when it answers

    @property
    def queues(self) -> int:
        counted = {irq.queue for irq in self.irqs if irq.queue is not None}
        return len(counted) or self.rx_queues


class Host:
    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.real = root.resolve() == Path("/")

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        try:
            return self.path(absolute).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    # --- CPUs and nodes ---------------------------------------------------------------

    def online_cpus(self) -> frozenset[int]:
        text = self.read("/sys/devices/system/cpu/online")
        if text is None:
            raise HostError(f"{self.path('/sys/devices/system/cpu/online')} is missing",
                            hint="point --root at a tree with sys/ and proc/")
        return cpulist.parse(text)

    def nodes(self) -> dict[int, frozenset[int]]:
        """NUMA node → its CPUs (one node 0 holding every CPU on a host without NUMA)."""
        found: dict[int, frozenset[int]] = {}
        base = self.path("/sys/devices/system/node")
        for entry in sorted(base.glob("node[0-9]*")) if base.is_dir() else []:
            cpus = (entry / "cpulist").read_text().strip() if (entry / "cpulist").exists() else ""
            found[int(entry.name[4:])] = cpulist.parse(cpus)
        return found or {0: self.online_cpus()}

    def has_cpufreq(self, cpu: int) -> bool:
        return self.path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq").is_dir()

    def boot_id(self) -> str:
        return self.read("/proc/sys/kernel/random/boot_id") or "unknown-boot"

    # --- NICs -------------------------------------------------------------------------

    def nic_names(self) -> list[str]:
        base = self.path("/sys/class/net")
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def serving_nics(self, wanted: list[str]) -> list[str]:
        """The NICs to tune: `wanted` (a bond replaced by its slaves), or every NIC backed by
        a device. Raises HostError naming a NIC that does not exist."""
        names = self.nic_names()
        if not wanted:
            return [n for n in names if self.path(f"/sys/class/net/{n}/device").exists()]
        out: list[str] = []
        for name in wanted:
            if name not in names:
                raise HostError(f"NIC {name!r} does not exist (this host has "
                                f"{', '.join(names) or 'none'})",
                                hint="fix tuning.nics in the configuration")
            slaves = self.read(f"/sys/class/net/{name}/bonding/slaves")
            out.extend(slaves.split() if slaves is not None else [name])
        return out

    def nics_named(self) -> bool:
        """True once every network-class PCI device has its interfaces registered by its
        driver and named by udev (the names tuning.nics lists and the IRQs tuning places),
        which is all the tuning waits for at boot; `udevadm settle` waits for every device
        on the machine. False while one is missing, or where there is no such device."""
        base = self.path("/sys/bus/pci/devices")
        found = False
        for device in sorted(base.iterdir()) if base.is_dir() else []:
            if not (self.read(f"/sys/bus/pci/devices/{device.name}/class") or "").startswith(
                    "0x02"):
                continue
            found = True
            interfaces = [*device.glob("net/*"), *device.glob("*/net/*")]  # virtio nests one
            if not interfaces:
                return False  # no driver yet, or one that has not registered its interfaces
            for interface in interfaces:
                try:
                    index = (interface / "ifindex").read_text().strip()
                except FileNotFoundError:  # renamed while we looked
                    return False
                if not self.path(f"/run/udev/data/n{index}").exists():
                    return False
        return found

    def _device_dir(self, nic: str) -> Path | None:
        link = self.path(f"/sys/class/net/{nic}/device")
        return Path(os.path.realpath(link)) if link.exists() else None

    def _device_attr(self, device: Path, name: str) -> str | None:
        """`name` of the device or, as for virtio, of its PCI parent."""
        for folder in (device, device.parent):
            if (folder / name).exists():
                return (folder / name).read_text().strip()
        return None

    def nic(self, name: str) -> Nic:
        device = self._device_dir(name)
        if device is None:
            raise HostError(f"NIC {name!r} has no device (a virtual link has no IRQs to "
                            "place)", hint="list physical NICs or bonds in tuning.nics")
        node_text = self._device_attr(device, "numa_node")
        node = int(node_text) if node_text and int(node_text) >= 0 else None
        local = self._device_attr(device, "local_cpulist")
        local_cpus = cpulist.parse(local) if local else self.online_cpus()
        irqs = tuple(self._irq(n) for n in self._msi_irqs(device))
        queues = self.path(f"/sys/class/net/{name}/queues")
        rx = len(list(queues.glob("rx-*"))) if queues.is_dir() else 0
        tx = len(list(queues.glob("tx-*"))) if queues.is_dir() else 0
        return Nic(name, node, local_cpus, irqs, rx, tx, self.channels(name))

    def _msi_irqs(self, device: Path) -> list[int]:
        for folder in (device, device.parent):
            if (folder / "msi_irqs").is_dir():
                return sorted(int(p.name) for p in (folder / "msi_irqs").iterdir())
        return []

    def _irq(self, number: int) -> Irq:
        name = self.read(f"/sys/kernel/irq/{number}/actions") or ""
        queue = None
        for pattern in QUEUE_NAMES:
            found = pattern.search(name)
            if found:
                queue = int(found.group(1))
                break
        return Irq(number, name, queue)

    def channels(self, nic: str) -> dict[str, int]:
        """ethtool's channel counts ({} when the driver has none). In a fake tree they come
        from `ethtool/<nic>.json`, since no ioctl reaches a folder."""
        if not self.real:
            sidecar = self.path(f"/ethtool/{nic}.json")
            return dict(json.loads(sidecar.read_text())) if sidecar.exists() else {}
        try:
            values = self._ethtool(nic, CHANNELS.pack(ETHTOOL_GCHANNELS, *[0] * 8))
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                return {}
            raise
        keys = ("max_rx", "max_tx", "max_other", "max_combined", "rx", "tx", "other",
                "combined")
        return dict(zip(keys, values[1:], strict=True))

    def set_channels(self, nic: str, combined: int) -> None:
        if not self.real:
            sidecar = self.path(f"/ethtool/{nic}.json")
            values = json.loads(sidecar.read_text())
            values["combined"] = combined
            sidecar.write_text(json.dumps(values))
            return
        now = self.channels(nic)
        self._ethtool(nic, CHANNELS.pack(ETHTOOL_SCHANNELS, 0, 0, 0, 0, now.get("rx", 0),
                                         now.get("tx", 0), now.get("other", 0), combined))

    @staticmethod
    def _ethtool(nic: str, request: bytes) -> tuple[int, ...]:
        buffer = bytearray(request)
        address = struct.pack("16sP", nic.encode(), _buffer_address(buffer))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, address)
        return CHANNELS.unpack(bytes(buffer))

    # --- irqbalance and mounts ----------------------------------------------------------

    def irqbalance_running(self) -> bool:
        """True when an irqbalance process runs (it would move our IRQs back)."""
        for comm in self.path("/proc").glob("[0-9]*/comm"):
            try:
                if comm.read_text().strip() == "irqbalance":
                    return True
            except OSError:
                continue  # the process ended while we looked
        return False

    def mounted(self, fstype: str, target: str) -> bool:
        mounts = self.read("/proc/mounts") or ""
        return any(line.split()[1:3] == [target, fstype] for line in mounts.splitlines()
                   if len(line.split()) >= 3)


def _buffer_address(buffer: bytearray) -> int:
    import ctypes

    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
