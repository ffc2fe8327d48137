"""The desired state of the host, from the configuration and what the host has.

`knobs()` lists every knob in the order apply writes them: memory first (hugepages want
unfragmented memory), then sysctl, THP and CPU power, then the NICs (queue counts before the
IRQs they create), irqbalance last. `apply()` journals the originals of what it is about to
change, writes, and verifies; `rollback()` writes the journaled originals back. Nothing here
rolls back on exit: a rollback at shutdown undoes the next boot's first minutes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import config, cpulist
from appliance.errors import AdpopError
from appliance.tuning.host import Host, HostError, Nic
from appliance.tuning.knobs import (
    NOT_AS_DESIRED,
    ChannelsKnob,
    ChoiceKnob,
    CpuListKnob,
    FileKnob,
    HugepagesKnob,
    Knob,
    KnobError,
    MaskKnob,
    MountKnob,
    Status,
)

# TuneD's latency-performance and network-latency profiles, with backlogs for an edge server.
LATENCY_PROFILE = {
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.core.netdev_max_backlog": "65536",
    "net.ipv4.tcp_fastopen": "3",
    "net.ipv4.tcp_slow_start_after_idle": "0",
    "kernel.numa_balancing": "0",
    "kernel.timer_migration": "0",
    "vm.stat_interval": "10",
    "vm.swappiness": "10",
    "vm.dirty_ratio": "10",
    "vm.dirty_background_ratio": "3",
}
RPS_SOCK_FLOW_ENTRIES = 32768
PAGE_SIZES = {"2M": 2 * 1024**2, "1G": 1024**3}
PAGE_DIRS = {"2M": "hugepages-2048kB", "1G": "hugepages-1048576kB"}
MOUNTS = {"2M": "/dev/hugepages", "1G": "/dev/hugepages1G"}
IRQBALANCE_DROP_IN = "/run/systemd/system/irqbalance.service.d/50-adpop.conf"


class TuneError(AdpopError):
    """The configuration asks for something this host cannot give."""


@dataclass(frozen=True)
class Layout:
    """Which CPU each shard runs on, which CPUs keep house, and the NUMA nodes."""

    shard_cpus: tuple[int, ...]
    housekeeping: frozenset[int]
    nodes: dict[int, frozenset[int]]

    def node_of(self, cpu: int) -> int:
        return next((n for n, cpus in self.nodes.items() if cpu in cpus), 0)

    def serving_cpus(self, nic: Nic) -> list[int]:
        """The shard CPUs a NIC's queues go to: those on its NUMA node when it has any."""
        local = [c for c in self.shard_cpus if c in nic.local_cpus]
        if nic.node is not None:
            on_node = [c for c in self.shard_cpus if c in self.nodes.get(nic.node, frozenset())]
            local = on_node or local
        return sorted(set(local or self.shard_cpus))


def layout(appliance: config.ApplianceConfig, host: Host) -> Layout:
    online = host.online_cpus()
    pinned = sorted(cpulist.parse(appliance.engine.cpus))
    missing = set(pinned) - online
    if missing:
        raise TuneError(f"engine.cpus names CPUs {cpulist.render(missing)} that are not online "
                        f"(online: {cpulist.render(online)})", hint="fix engine.cpus")
    pool = pinned or sorted(online)
    shards = appliance.engine.shards
    shard_cpus = tuple(pool[k % len(pool)] for k in range(shards))  # as the engine pins them
    housekeeping = cpulist.parse(appliance.tuning.housekeeping_cpus) & online
    if not housekeeping:
        housekeeping = (online - set(shard_cpus)) or online
    return Layout(shard_cpus, frozenset(housekeeping), host.nodes())


LOCAL_PORT_RANGE = "net.ipv4.ip_local_port_range"


def sysctl_values(appliance: config.ApplianceConfig) -> dict[str, str]:
    values = dict(LATENCY_PROFILE)
    # Not the profile's wide 1024-65535: the XDP filter lets replies in on this same range,
    # and a range over 8080 or 6379 lets an outbound connection take a listener's port.
    first, last = config.port_range(appliance.tuning.local_port_range)
    values[LOCAL_PORT_RANGE] = f"{first} {last}"
    if appliance.tuning.busy_poll_us:
        values["net.core.busy_poll"] = values["net.core.busy_read"] = \
            str(appliance.tuning.busy_poll_us)
    for item in appliance.tuning.sysctl:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TuneError(f"tuning.sysctl entry {item!r} is not key=value",
                            hint='write e.g. "net.core.somaxconn=4096"')
        if key.strip() == LOCAL_PORT_RANGE:
            raise TuneError(f"tuning.sysctl sets {LOCAL_PORT_RANGE}, which the XDP filter's "
                            "reply ports must follow",
                            hint="set tuning.local_port_range instead")
        values[key.strip()] = value.strip()
    return values


def _sysctl_path(host: Host, key: str) -> Path:
    return host.path("/proc/sys/" + key.replace(".", "/"))


def memory_knobs(appliance: config.ApplianceConfig, host: Host, lay: Layout) -> list[Knob]:
    t = appliance.tuning
    if not t.hugepages_per_shard:
        return []
    size = PAGE_SIZES[t.hugepage_size]
    per_node: dict[int, int] = {}
    for cpu in lay.shard_cpus:
        node = lay.node_of(cpu)
        per_node[node] = per_node.get(node, 0) + t.hugepages_per_shard
    knobs: list[Knob] = []
    for node, wanted in sorted(per_node.items()):
        path = host.path(f"/sys/devices/system/node/node{node}/hugepages/"
                         f"{PAGE_DIRS[t.hugepage_size]}/nr_hugepages")
        if not path.exists():  # a host without NUMA sysfs: the global count
            path = host.path(f"/sys/kernel/mm/hugepages/{PAGE_DIRS[t.hugepage_size]}/"
                             "nr_hugepages")
        knobs.append(HugepagesKnob(f"hugepages node{node} {t.hugepage_size}", "hugepages",
                                   path, str(math.ceil(wanted / size)),
                                   f"{wanted // 1024**2} MiB for the shards on node {node}",
                                   compact=host.path("/proc/sys/vm/compact_memory")))
    target = MOUNTS[t.hugepage_size]
    knobs.append(MountKnob(f"hugetlbfs {target}", "hugepages", host.path(target), "mounted",
                           "where the engine maps its huge pages", host=host, target=target,
                           options=f"pagesize={t.hugepage_size}"))
    return knobs


def system_knobs(appliance: config.ApplianceConfig, host: Host, lay: Layout) -> list[Knob]:
    knobs: list[Knob] = [Knob(f"sysctl {key}", "sysctl", _sysctl_path(host, key), value)
                         for key, value in sysctl_values(appliance).items()]
    thp = host.path("/sys/kernel/mm/transparent_hugepage/enabled")
    knobs.append(ChoiceKnob("thp enabled", "thp", thp, appliance.tuning.thp))
    for cpu in sorted(set(lay.shard_cpus)):
        base = f"/sys/devices/system/cpu/cpu{cpu}"
        if host.has_cpufreq(cpu):
            governors = (host.read(f"{base}/cpufreq/scaling_available_governors") or "").split()
            if appliance.tuning.governor in governors:
                knobs.append(Knob(f"cpu{cpu} governor", "cpu",
                                  host.path(f"{base}/cpufreq/scaling_governor"),
                                  appliance.tuning.governor))
            if host.read(f"{base}/cpufreq/energy_performance_preference") is not None:
                knobs.append(Knob(f"cpu{cpu} epp", "cpu",
                                  host.path(f"{base}/cpufreq/energy_performance_preference"),
                                  "performance"))
        if host.read(f"{base}/power/energy_perf_bias") is not None:
            knobs.append(Knob(f"cpu{cpu} epb", "cpu", host.path(f"{base}/power/energy_perf_bias"),
                              "0"))
    knobs.append(MaskKnob("irq default affinity", "irq",
                          host.path("/proc/irq/default_smp_affinity"),
                          cpulist.render(lay.housekeeping), "new IRQs start on housekeeping CPUs"))
    return knobs


def channel_knobs(appliance: config.ApplianceConfig, host: Host, nics: list[Nic]) -> list[Knob]:
    knobs: list[Knob] = []
    for nic in nics:
        most = nic.channels.get("max_combined", 0)
        if most > 0:
            want = min(appliance.engine.shards, most)
            knobs.append(ChannelsKnob(f"{nic.name} queues", "queues",
                                      host.path(f"/sys/class/net/{nic.name}"), str(want),
                                      "one queue per shard", host=host, nic=nic.name))
    return knobs


def nic_knobs(appliance: config.ApplianceConfig, host: Host, lay: Layout,
              nics: list[Nic]) -> list[Knob]:
    knobs: list[Knob] = []
    use_rps = False
    for nic in nics:
        cpus = lay.serving_cpus(nic)
        house = cpulist.render(lay.housekeeping)
        for irq in nic.irqs:
            if irq.queue is None:
                desired, why = house, f"{irq.name or 'IRQ'}: not a queue, housekeeping"
            else:
                desired = str(cpus[irq.queue % len(cpus)])
                why = f"{irq.name} → shard CPU (queue {irq.queue})"
            knob = CpuListKnob(f"irq {irq.number} {nic.name}", "irq",
                               host.path(f"/proc/irq/{irq.number}/smp_affinity_list"), desired,
                               why, effective=host.path(
                                   f"/proc/irq/{irq.number}/effective_affinity_list"))
            knobs.append(knob)
        queues = max(nic.queues, 1)
        rps = queues < len(set(lay.shard_cpus))  # RPS only when queues are fewer than shards
        use_rps = use_rps or rps
        base = f"/sys/class/net/{nic.name}/queues"
        for k in range(nic.rx_queues):
            knobs.append(MaskKnob(f"{nic.name} rx-{k} rps", "rps",
                                  host.path(f"{base}/rx-{k}/rps_cpus"),
                                  cpulist.render(cpus) if rps else "",
                                  "spread to the shards" if rps else "queues cover the shards"))
            knobs.append(Knob(f"{nic.name} rx-{k} rps_flow_cnt", "rps",
                              host.path(f"{base}/rx-{k}/rps_flow_cnt"),
                              str(RPS_SOCK_FLOW_ENTRIES // queues if rps else 0)))
        for k in range(nic.tx_queues):
            if host.path(f"{base}/tx-{k}/xps_cpus").exists():
                knobs.append(MaskKnob(f"{nic.name} tx-{k} xps", "xps",
                                      host.path(f"{base}/tx-{k}/xps_cpus"),
                                      str(cpus[k % len(cpus)]), "transmit on the CPU of rx-K"))
    if use_rps:
        knobs.append(Knob("sysctl net.core.rps_sock_flow_entries", "rps",
                          _sysctl_path(host, "net.core.rps_sock_flow_entries"),
                          str(RPS_SOCK_FLOW_ENTRIES), "RFS table"))
    return knobs


def irqbalance_knobs(host: Host, lay: Layout, nic_irqs: Iterable[int]) -> list[Knob]:
    if not host.irqbalance_running():
        return []
    bans = " ".join(f"--banirq={n}" for n in sorted(nic_irqs))
    text = ("# Written by adpop tune: irqbalance keeps off the shard CPUs and our NIC IRQs.\n"
            "[Service]\n"
            f"Environment=IRQBALANCE_BANNED_CPULIST={cpulist.render(lay.shard_cpus)}\n"
            f'Environment="IRQBALANCE_ARGS={bans}"\n')
    return [FileKnob("irqbalance ban", "irqbalance", host.path(IRQBALANCE_DROP_IN), text,
                     "irqbalance would undo the IRQ placement")]


@dataclass
class Desired:
    layout: Layout
    nics: list[Nic]
    knobs: list[Knob]


def desired(appliance: config.ApplianceConfig, host: Host) -> Desired:
    lay = layout(appliance, host)
    nics = [host.nic(name) for name in host.serving_nics(list(appliance.tuning.nics))]
    knobs = (memory_knobs(appliance, host, lay) + system_knobs(appliance, host, lay)
             + channel_knobs(appliance, host, nics) + nic_knobs(appliance, host, lay, nics)
             + irqbalance_knobs(host, lay, (irq.number for nic in nics for irq in nic.irqs)))
    return Desired(lay, nics, knobs)


# --- plan, apply, verify ---------------------------------------------------------------


def shown(host: Host, path: Path) -> str:
    """A knob's path as the operator knows it (without the --root prefix)."""
    try:
        return "/" + str(path.relative_to(host.root)).lstrip("/")
    except ValueError:
        return str(path)


def rows(host: Host, knobs: list[Knob], owned: set[str] | None = None) -> list[dict[str, Any]]:
    """Each knob's current and desired value and status; a knob in `owned` that differs is
    kernel-owned (the kernel refused it at apply), not drift."""
    out = []
    for knob in knobs:
        status = knob.verify()
        if status is Status.DRIFT and knob.name in (owned or set()):
            status = Status.KERNEL_OWNED
        out.append({"name": knob.name, "group": knob.group, "path": shown(host, knob.path),
                    "current": knob.current(), "desired": knob.desired, "status": status.value,
                    "why": knob.why})
    return out


def report(appliance: config.ApplianceConfig, host: Host) -> tuple[Desired, list[dict[str, Any]]]:
    """The desired state and every knob's row against the host, kernel-owned ones marked:
    what plan, verify, the drift watcher and the control API all show."""
    want = desired(appliance, host)
    return want, rows(host, want.knobs, kernel_owned(appliance, host))


def not_as_desired(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in table if row["status"] in NOT_AS_DESIRED]


def pending(knob: Knob) -> bool:
    return knob.verify() in (Status.DRIFT, Status.SHORT)


def written_value(knob: Knob) -> str:
    from appliance.tuning.knobs import cpus_to_mask

    if isinstance(knob, MaskKnob):
        return cpus_to_mask(cpulist.parse(knob.desired))
    return knob.desired


class Journal:
    """The originals of every knob adpop changed this boot: in /run (gone at reboot, as the
    changes are) and copied under the state directory for the record."""

    def __init__(self, host: Host, state_dir: Path) -> None:
        self.boot = host.boot_id()
        self.path = host.path(f"/run/adpop-tune/journal-{self.boot}.json")
        self.copy = state_dir / "tuning" / f"journal-{self.boot}.json"
        self.host = host

    def entries(self) -> dict[str, dict[str, Any]]:
        for path in (self.path, self.copy):
            if path.exists():
                loaded: dict[str, dict[str, Any]] = json.loads(path.read_text())
                return loaded
        return {}

    def record(self, knobs: list[Knob]) -> None:
        """Adds the originals of `knobs` not journaled yet: the first value wins, so a
        second apply never records adpop's own values as originals."""
        entries = self.entries()
        for knob in knobs:
            if knob.name not in entries:
                entries[knob.name] = {"type": type(knob).__name__, "group": knob.group,
                                      "path": shown(self.host, knob.path), "raw": knob.read(),
                                      **_extra(knob)}
        self._save(entries)

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        for path in (self.path, self.copy):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries, indent=1))
            os.replace(tmp, path)

    def mark_kernel_owned(self, names: list[str]) -> None:
        entries = self.entries()
        for name in names:
            entries.setdefault(name, {})["kernel_owned"] = True
        self._save(entries)

    def kernel_owned(self) -> set[str]:
        return {name for name, entry in self.entries().items() if entry.get("kernel_owned")}

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)
        self.copy.unlink(missing_ok=True)


def _extra(knob: Knob) -> dict[str, Any]:
    if isinstance(knob, ChannelsKnob):
        return {"nic": knob.nic}
    if isinstance(knob, MountKnob):
        return {"target": knob.target, "options": knob.options,
                "dir_existed": knob.path.is_dir()}
    return {}


def knob_from_entry(host: Host, name: str, entry: dict[str, Any]) -> Knob:
    kinds: dict[str, type[Knob]] = {k.__name__: k for k in (
        Knob, CpuListKnob, MaskKnob, ChoiceKnob, HugepagesKnob, ChannelsKnob, MountKnob,
        FileKnob)}
    kind = kinds[entry["type"]]
    path = host.path(entry["path"])
    if kind is ChannelsKnob:
        return ChannelsKnob(name, entry["group"], path, "", host=host, nic=entry["nic"])
    if kind is MountKnob:
        return MountKnob(name, entry["group"], path, "", host=host, target=entry["target"],
                         options=entry["options"], dir_existed=entry["dir_existed"])
    return kind(name, entry["group"], path, "")


@dataclass
class Outcome:
    name: str
    path: str
    result: str  # written, kernel-owned, failed: ..., short: N of M, would write ...


UDEV_SETTLE = ("udevadm", "settle")


def wait_for_nics(host: Host, timeout: float, settle: Sequence[str] = UDEV_SETTLE) -> str:
    """At boot, before the first plan: returns once the NICs are named (Host.nics_named) or
    udev has finished every device (`settle`), whichever comes first, else after `timeout`;
    says which. The NICs are usually named seconds before udev finishes the rest of the
    machine (GPUs, watchdogs, sound), and the engine waits for the tuning."""
    try:
        settling = subprocess.Popen([*settle, f"--timeout={math.ceil(timeout)}"])
    except FileNotFoundError:  # no udev here, so nothing will name the NICs later either
        return f"no {settle[0]}, not waiting"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if host.nics_named():
                return "NICs named"
            if settling.poll() is not None:
                return "udev settled"
            if time.monotonic() > deadline:
                return f"gave up after {timeout:g} s"
            time.sleep(0.05)
    finally:
        if settling.poll() is None:
            settling.kill()
            settling.wait()


def apply(appliance: config.ApplianceConfig, host: Host, dry_run: bool = False) -> list[Outcome]:
    """Writes every knob that differs (queue counts first, then a fresh plan for the IRQs
    they made); journals originals before the first write."""
    journal = Journal(host, Path(appliance.paths.state_dir))
    outcomes: list[Outcome] = []
    want = desired(appliance, host)
    queue_knobs = [k for k in want.knobs if k.group == "queues" and pending(k)]
    if queue_knobs and not dry_run:
        outcomes += _write(host, journal, queue_knobs)
        want = desired(appliance, host)  # new queues, new IRQs
    todo = [k for k in want.knobs if pending(k) and k.group != "queues"]
    if dry_run:
        return [Outcome(k.name, shown(host, k.path), f"would write {written_value(k)!r}")
                for k in [*queue_knobs, *todo]]
    outcomes += _write(host, journal, todo)
    if any(k.group == "irqbalance" for k in todo) and host.real:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        subprocess.run(["systemctl", "try-restart", "irqbalance.service"], check=False)
    return outcomes


def _write(host: Host, journal: Journal, knobs: list[Knob]) -> list[Outcome]:
    journal.record(knobs)
    out = []
    for knob in knobs:
        try:
            knob.apply()
            result = "written"
            if isinstance(knob, HugepagesKnob) and knob.shortfall:
                result = f"short: {int(knob.desired) - knob.shortfall} of {knob.desired} pages"
        except KnobError as exc:
            result = "kernel-owned" if knob.refused else f"failed: {exc.message}"
        out.append(Outcome(knob.name, shown(host, knob.path), result))
    journal.mark_kernel_owned([o.name for o in out if o.result == "kernel-owned"])
    return out


def kernel_owned(appliance: config.ApplianceConfig, host: Host) -> set[str]:
    """Knobs the kernel refused at this boot's applies."""
    return Journal(host, Path(appliance.paths.state_dir)).kernel_owned()


def rollback(appliance: config.ApplianceConfig, host: Host) -> list[Outcome]:
    """Writes back every journaled original of this boot, newest change first, checks each
    reads back as it was, and forgets the journal."""
    journal = Journal(host, Path(appliance.paths.state_dir))
    entries = journal.entries()
    if not entries:
        raise TuneError(f"nothing to roll back: no tuning journal for this boot "
                        f"({journal.boot}) in {shown(host, journal.path)}",
                        hint="adpop tune apply writes one before its first change")
    out = []
    failed = False
    for name, entry in reversed(list(entries.items())):
        knob = knob_from_entry(host, name, entry)
        original = entry["raw"]
        try:
            knob.revert(original)
            back = knob.read()
            same = (back == original if original is None or back is None
                    else knob.normalize(back) == knob.normalize(original))
            result = "restored" if same else f"reads {back!r}, not {original!r}"
            failed = failed or not same
        except KnobError as exc:
            result = "kernel-owned" if knob.refused else f"failed: {exc.message}"
            failed = failed or not knob.refused
        out.append(Outcome(name, entry["path"], result))
    if not failed:
        journal.forget()
    return out


def load_host(root: str | None) -> Host:
    host = Host(Path(root) if root else Path("/"))
    if not host.path("/sys").is_dir():
        raise HostError(f"{host.path('/sys')} does not exist",
                        hint="give --root a folder holding sys/ and proc/")
    return host


def cmdline(appliance: config.ApplianceConfig, host: Host) -> str:
    """The kernel command line the image boots with: huge pages reserved per node at boot
    (1 GB pages can only be had then), shard CPUs isolated from the scheduler, ticks, RCU
    callbacks and unmanaged IRQs, THP mode."""
    lay = layout(appliance, host)
    t = appliance.tuning
    parts = []
    if t.hugepages_per_shard:
        per_node: dict[int, int] = {}
        for cpu in lay.shard_cpus:
            node = lay.node_of(cpu)
            per_node[node] = per_node.get(node, 0) + t.hugepages_per_shard
        size = PAGE_SIZES[t.hugepage_size]
        counts = ",".join(f"{n}:{math.ceil(b / size)}" for n, b in sorted(per_node.items()))
        parts += [f"default_hugepagesz={t.hugepage_size}", f"hugepagesz={t.hugepage_size}",
                  f"hugepages={counts}"]
    shards = cpulist.render(lay.shard_cpus)
    # Only CPUs the operator reserved for the shards are isolated. Unpinned shards run where
    # the scheduler puts them, and an image built for any server must not isolate the build
    # host's CPU 0 (the image once did, and booted on one CPU).
    if appliance.engine.cpus and set(lay.shard_cpus).isdisjoint(lay.housekeeping):
        parts += [f"isolcpus=managed_irq,domain,{shards}", f"nohz_full={shards}",
                  f"rcu_nocbs={shards}", f"irqaffinity={cpulist.render(lay.housekeeping)}"]
    parts.append(f"transparent_hugepage={t.thp}")
    return " ".join(parts)

