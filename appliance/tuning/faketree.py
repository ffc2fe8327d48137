"""Fake sysfs/procfs trees for `adpop tune --root`: the shapes of real hosts, written as plain
files, for the tests and the benchmark.

A tree holds what tuning reads: CPUs and NUMA nodes, NICs (a device link, msi_irqs, queues),
/sys/kernel/irq/N/actions names, /proc/irq/N affinity files, the sysctl files of the latency
profile, THP, hugepages per node and `ethtool/<nic>.json` for the channel counts a real host
gives through an ioctl. A managed IRQ is made immutable (chattr +i), so writing it fails with
EPERM even for root, as the kernel refuses a managed IRQ.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from appliance import cpulist
from appliance.tuning.plan import LATENCY_PROFILE, PAGE_DIRS

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10

SYSCTL_DEFAULTS = {
    "net.core.somaxconn": "4096", "net.ipv4.tcp_max_syn_backlog": "1024",
    "net.core.netdev_max_backlog": "1000", "net.ipv4.tcp_fastopen": "1",
    "net.ipv4.tcp_slow_start_after_idle": "1", "net.ipv4.ip_local_port_range": "32768\t60999",
    "kernel.numa_balancing": "1", "kernel.timer_migration": "1", "vm.stat_interval": "1",
    "vm.swappiness": "60", "vm.dirty_ratio": "20", "vm.dirty_background_ratio": "10",
    "net.core.rps_sock_flow_entries": "0", "net.core.busy_poll": "0",
    "net.core.busy_read": "0", "vm.compact_memory": "",
}


@dataclass
class FakeNic:
    name: str
    kind: str  # "virtio" or "pci" (mlx5-style)
    queues: int
    node: int = -1
    local_cpus: str = ""
    channels: dict[str, int] = field(default_factory=dict)
    managed: tuple[int, ...] = ()  # queue numbers whose IRQs the kernel manages


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def set_immutable(path: Path, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)


def release(root: Path) -> None:
    """Clears the immutable flags so the tree can be deleted."""
    for path in root.glob("proc/irq/*/smp_affinity_list"):
        set_immutable(path, False)


def build(root: Path, cpus: int, nodes: int, nics: list[FakeNic], cpufreq: bool = False,
          irqbalance: bool = False, first_irq: int = 24, bonds: dict[str, list[str]] | None = None
          ) -> Path:
    online = f"0-{cpus - 1}"
    _write(root / "sys/devices/system/cpu/online", online)
    per_node = cpus // nodes
    for n in range(nodes):
        node = root / f"sys/devices/system/node/node{n}"
        _write(node / "cpulist", cpulist.render(range(n * per_node, (n + 1) * per_node)))
        for pages in PAGE_DIRS.values():
            _write(node / "hugepages" / pages / "nr_hugepages", "0")
    if cpufreq:
        for cpu in range(cpus):
            base = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
            _write(base / "scaling_governor", "powersave")
            _write(base / "scaling_available_governors", "performance powersave")
            _write(base / "energy_performance_preference", "balance_power")
    _write(root / "sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never")
    for key, value in {**SYSCTL_DEFAULTS, **{k: SYSCTL_DEFAULTS.get(k, "0")
                                             for k in LATENCY_PROFILE}}.items():
        _write(root / "proc/sys" / key.replace(".", "/"), value)
    _write(root / "proc/sys/kernel/random/boot_id", "00000000-fake-boot-0000-000000000000")
    _write(root / "proc/irq/default_smp_affinity", f"{(1 << cpus) - 1:x}")
    _write(root / "proc/mounts", "proc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0")
    if irqbalance:
        _write(root / "proc/4242/comm", "irqbalance")
    irq = first_irq
    for index, nic in enumerate(nics):
        irq = _nic(root, nic, index, irq, online)
    for bond, slaves in (bonds or {}).items():
        _write(root / f"sys/class/net/{bond}/bonding/slaves", " ".join(slaves))
    (root / "sys/class/net/lo").mkdir(parents=True, exist_ok=True)
    return root


def _irq(root: Path, number: int, name: str, online: str, managed: bool) -> None:
    _write(root / f"sys/kernel/irq/{number}/actions", name)
    path = root / f"proc/irq/{number}/smp_affinity_list"
    _write(path, online)
    if managed:
        set_immutable(path, True)


def _nic(root: Path, nic: FakeNic, index: int, irq: int, online: str) -> int:
    pci = root / f"sys/devices/pci0000:00/0000:{index + 3:02x}:00.0"
    _write(pci / "numa_node", str(nic.node))
    _write(pci / "local_cpulist", nic.local_cpus or online)
    device = pci / f"virtio{index}" if nic.kind == "virtio" else pci
    device.mkdir(parents=True, exist_ok=True)
    names: list[tuple[str, int | None]]
    if nic.kind == "virtio":
        names = [(f"virtio{index}-config", None)]
        for q in range(nic.queues):
            names += [(f"virtio{index}-input.{q}", q), (f"virtio{index}-output.{q}", q)]
    else:
        names = [(f"mlx5_async0@pci:0000:{index + 3:02x}:00.0", None)]
        names += [(f"mlx5_comp{q}@pci:0000:{index + 3:02x}:00.0", q) for q in range(nic.queues)]
    for name, queue in names:
        _write(pci / "msi_irqs" / str(irq), "msix")
        _irq(root, irq, name, online, queue is not None and queue in nic.managed)
        irq += 1
    net = root / f"sys/class/net/{nic.name}"
    net.mkdir(parents=True, exist_ok=True)
    (net / "device").symlink_to(os.path.relpath(device, net))
    for q in range(nic.queues):
        _write(net / f"queues/rx-{q}/rps_cpus", "0")
        _write(net / f"queues/rx-{q}/rps_flow_cnt", "0")
        _write(net / f"queues/tx-{q}/xps_cpus", "0")
    if nic.channels:
        _write(root / f"ethtool/{nic.name}.json", json.dumps(nic.channels))
    return irq
