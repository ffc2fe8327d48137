"""Host tuning: plans over fake sysfs/procfs trees, apply/verify/rollback on them, and one run
against this machine's real /sys and /proc that leaves it as it found it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config as cfg
from appliance.tuning import faketree, plan
from appliance.tuning.faketree import FakeNic
from appliance.tuning.host import Host, HostError
from tests.waiting import until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


class Tree:
    def __init__(self, root: Path, config: Path) -> None:
        self.root, self.config = root, config

    def adpop(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", "tune", *args, "--root",
                               str(self.root), "--config", str(self.config)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, check=False)

    def plan(self) -> dict[str, dict[str, Any]]:
        result = self.adpop("plan", "--json")
        assert result.returncode == 0, result.stderr
        return {k["name"]: k for k in json.loads(result.stdout)["knobs"]}

    def values(self) -> dict[str, str | None]:
        """Every knob's normalized current value."""
        return {name: k["current"] for name, k in self.plan().items()}


@pytest.fixture
def make_tree(tmp_path: Path) -> Iterator[Any]:
    roots: list[Path] = []

    def make(config: str, **kwargs: Any) -> Tree:
        root = tmp_path / f"tree{len(roots)}"
        roots.append(root)
        faketree.build(root, **kwargs)
        path = tmp_path / f"tree{len(roots)}.toml"
        path.write_text(config + f'\n[paths]\nstate_dir = "{tmp_path}/state{len(roots)}"\n')
        return Tree(root, path)

    yield make
    for root in roots:
        faketree.release(root)
        shutil.rmtree(root)


VIRTIO = dict(cpus=2, nodes=1, nics=[FakeNic("eth0", "virtio", 1)])
MLX = dict(cpus=16, nodes=2, cpufreq=True, irqbalance=True,
           nics=[FakeNic("ens1f0", "pci", 16, node=1, local_cpus="8-15",
                         channels={"max_combined": 16, "combined": 16}, managed=(3,))])
MLX_CONFIG = '[engine]\nshards = 8\ncpus = "2-3,10-15"\n[tuning]\nnics = ["ens1f0"]'


def test_virtio_plan(make_tree: Any) -> None:
    tree = make_tree('[engine]\nshards = 1\ncpus = "1"', **VIRTIO)
    knobs = tree.plan()
    assert knobs["irq 24 eth0"]["desired"] == "0"  # virtio0-config: housekeeping
    assert knobs["irq 25 eth0"]["desired"] == "1"  # virtio0-input.0: shard 0's CPU
    assert knobs["irq 26 eth0"]["desired"] == "1"  # virtio0-output.0
    assert knobs["irq default affinity"]["desired"] == "0"
    assert knobs["hugepages node0 2M"]["desired"] == "128"  # 256 MiB of 2 MB pages
    assert knobs["eth0 rx-0 rps"]["desired"] == ""  # one queue for one shard: no RPS
    assert knobs["thp enabled"]["current"] == "always"
    assert not [n for n in knobs if n.startswith("cpu")], "no cpufreq: no CPU power knobs"
    assert "eth0 queues" not in knobs  # no channels from this driver


def test_mlx_plan_on_two_numa_nodes(make_tree: Any) -> None:
    tree = make_tree(MLX_CONFIG, **MLX)
    knobs = tree.plan()
    # Hugepages per node from the shards on it: 2 on node 0, 6 on node 1.
    assert knobs["hugepages node0 2M"]["desired"] == "256"
    assert knobs["hugepages node1 2M"]["desired"] == "768"
    # The NIC sits on node 1: its queues go to the shard CPUs there, 10-15, in turn.
    for queue in range(16):
        assert knobs[f"irq {25 + queue} ens1f0"]["desired"] == str(10 + queue % 6)
    assert knobs["irq 24 ens1f0"]["desired"] == "0-1,4-9"  # mlx5_async: housekeeping
    assert knobs["ens1f0 queues"]["desired"] == "8"  # one per shard
    assert knobs["ens1f0 tx-3 xps"]["desired"] == "13"
    assert knobs["cpu10 governor"]["desired"] == "performance"
    assert knobs["cpu0 governor" if "cpu0 governor" in knobs else "cpu2 epp"]["current"] == \
        "balance_power"
    assert "cpu0 governor" not in knobs  # housekeeping CPUs keep their governor
    ban = knobs["irqbalance ban"]["desired"]
    assert "IRQBALANCE_BANNED_CPULIST=2-3,10-15" in ban and "--banirq=40" in ban


def test_bond_with_fewer_queues_than_shards_uses_rps(make_tree: Any) -> None:
    tree = make_tree('[engine]\nshards = 4\ncpus = "0-3"\n[tuning]\nnics = ["bond0"]\n'
                     'housekeeping_cpus = "0"',
                     cpus=4, nodes=1, nics=[FakeNic("eth0", "virtio", 2),
                                            FakeNic("eth1", "pci", 2)],
                     bonds={"bond0": ["eth0", "eth1"]})
    knobs = tree.plan()
    for nic in ("eth0", "eth1"):  # the bond stands for its slaves
        assert knobs[f"{nic} rx-1 rps"]["desired"] == "0-3"
        assert knobs[f"{nic} rx-1 rps_flow_cnt"]["desired"] == "16384"
    assert knobs["sysctl net.core.rps_sock_flow_entries"]["desired"] == "32768"
    assert knobs["irq default affinity"]["desired"] == "0"


def test_apply_verify_rollback_on_a_tree(make_tree: Any) -> None:
    tree = make_tree(MLX_CONFIG, **MLX)
    before = tree.values()
    dry = tree.adpop("apply", "--dry-run")
    assert dry.returncode == 0 and "would write '00000400'" in dry.stdout  # CPU 10 as a mask
    assert tree.values() == before, "a dry run writes nothing"

    applied = tree.adpop("apply", "--wait-for-nics", "5")  # as the unit runs it at boot
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert applied.stdout.startswith("waited for the NICs: ")
    assert "irq 28 ens1f0: /proc/irq/28/smp_affinity_list: kernel-owned" in applied.stdout
    verify = tree.adpop("verify", "--json")
    assert verify.returncode == 0, verify.stdout
    states = {k["name"]: k["status"] for k in json.loads(verify.stdout)["knobs"]}
    assert states["irq 28 ens1f0"] == "kernel-owned"  # the managed IRQ: reported, not failed
    assert states["irq 27 ens1f0"] == "ok" and states["hugepages node1 2M"] == "ok"

    # Drift, then a second apply: the journal keeps the first originals.
    swappiness = tree.root / "proc/sys/vm/swappiness"
    swappiness.write_text("33\n")
    assert tree.adpop("verify").returncode == 1
    assert tree.adpop("apply").returncode == 0
    assert tree.adpop("verify").returncode == 0

    rolled = tree.adpop("rollback")
    assert rolled.returncode == 0, rolled.stdout
    assert tree.values() == before
    assert swappiness.read_text() == "60\n"
    again = tree.adpop("rollback")
    assert again.returncode == 2 and "nothing to roll back" in again.stderr


@pytest.mark.parametrize(("config", "message"), [
    ('[tuning]\nnics = ["eth9"]', "NIC 'eth9' does not exist (this host has eth0, lo)"),
    ('[engine]\ncpus = "5"', "engine.cpus names CPUs 5 that are not online (online: 0-1)"),
    ('[tuning]\nsysctl = ["vm.swappiness"]', "tuning.sysctl entry 'vm.swappiness' is not"),
    ('[tuning]\nnics = ["lo"]', "NIC 'lo' has no device"),
    ('[tuning]\nsysctl = ["net.ipv4.ip_local_port_range=1024 65535"]',
     "set tuning.local_port_range instead"),
    ('[tuning]\nlocal_port_range = "80-90000"', "use a range from 1024 to 65535"),
])
def test_bad_input_is_one_line_and_writes_nothing(make_tree: Any, config: str,
                                                  message: str) -> None:
    tree = make_tree(config, **VIRTIO)
    before = {p: p.read_bytes() for p in tree.root.rglob("*") if p.is_file()}
    result = tree.adpop("apply")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert {p: p.read_bytes() for p in tree.root.rglob("*") if p.is_file()} == before


def test_root_without_sys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="does not exist"):
        plan.load_host(str(tmp_path))


def test_cmdline(make_tree: Any) -> None:
    tree = make_tree(MLX_CONFIG, **MLX)
    result = tree.adpop("cmdline")
    assert result.stdout.split() == [
        "default_hugepagesz=2M", "hugepagesz=2M", "hugepages=0:256,1:768",
        "isolcpus=managed_irq,domain,2-3,10-15", "nohz_full=2-3,10-15", "rcu_nocbs=2-3,10-15",
        "irqaffinity=0-1,4-9", "transparent_hugepage=madvise"]


def test_cmdline_isolates_nothing_when_the_shards_are_not_pinned(make_tree: Any) -> None:
    tree = make_tree('[engine]\nshards = 2\n', **VIRTIO)
    result = tree.adpop("cmdline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["default_hugepagesz=2M", "hugepagesz=2M", "hugepages=0:256",
                                     "transparent_hugepage=madvise"]


# --- this machine, for real ---------------------------------------------------------------


def raw_values(knobs: list[Any]) -> dict[str, str | None]:
    return {k.name: k.read() for k in knobs}


SLOW_SETTLE = ("sh", "-c", "sleep 60", "udevadm-settle")


def nic_tree(root: Path) -> Path:
    """A GPU and a virtio NIC on the PCI bus, the NIC's driver not bound yet."""
    for address, kind in (("0000:00:01.0", "0x030000"), ("0000:00:03.0", "0x020000")):
        device = root / "sys/bus/pci/devices" / address
        device.mkdir(parents=True)
        (device / "class").write_text(kind + "\n")
    return root / "sys/bus/pci/devices/0000:00:03.0"


def test_nics_are_named_once_udev_has_initialised_their_interfaces(tmp_path: Path) -> None:
    host = Host(tmp_path)
    assert not host.nics_named()  # no NIC at all: only udev settling ends the wait
    nic = nic_tree(tmp_path)
    assert not host.nics_named()  # no driver yet
    (nic / "virtio0/net/eth0").mkdir(parents=True)
    (nic / "virtio0/net/eth0/ifindex").write_text("2\n")
    assert not host.nics_named()  # registered, not yet named by udev
    (nic / "virtio0/net/eth0").rename(nic / "virtio0/net/enp0s3")
    (tmp_path / "run/udev/data").mkdir(parents=True)
    (tmp_path / "run/udev/data/n2").write_text("")
    assert host.nics_named()
    (nic / "net/ens3f1").mkdir(parents=True)  # a second port, registered but not named
    (nic / "net/ens3f1/ifindex").write_text("3\n")
    assert not host.nics_named()


def test_wait_for_nics_ends_on_the_nics_or_on_udev(tmp_path: Path) -> None:
    host = Host(tmp_path)
    nic = nic_tree(tmp_path)
    assert plan.wait_for_nics(host, 60, settle=("true",)) == "udev settled"
    assert plan.wait_for_nics(host, 0.2, settle=SLOW_SETTLE) == "gave up after 0.2 s"
    assert plan.wait_for_nics(host, 60, settle=("no-such-udevadm",)) == \
        "no no-such-udevadm, not waiting"

    def named_later() -> None:
        time.sleep(0.3)
        (nic / "net/enp0s3").mkdir(parents=True)
        (nic / "net/enp0s3/ifindex").write_text("2\n")
        (tmp_path / "run/udev/data").mkdir(parents=True)
        (tmp_path / "run/udev/data/n2").write_text("")

    naming = threading.Thread(target=named_later)
    naming.start()
    try:
        assert plan.wait_for_nics(host, 60, settle=SLOW_SETTLE) == "NICs named"
    finally:
        naming.join()


def test_apply_and_rollback_on_this_host(tmp_path: Path) -> None:
    """Reserves 2 MB pages on node 0 and pins the NIC's virtio queue IRQs on the real
    /sys and /proc, verifies, rolls back and compares every value with the original."""
    config = tmp_path / "appliance.toml"
    config.write_text(f'[engine]\nshards = 1\ncpus = "1"\n[tuning]\n'
                      f'hugepages_per_shard = "64MiB"\n[paths]\nstate_dir = "{tmp_path}"\n')
    appliance = cfg.load(cfg.Scope.APPLIANCE, config)
    host = Host()
    want = plan.desired(appliance, host)
    before = raw_values(want.knobs)
    had_mount_point = Path("/dev/hugepages").exists()
    queue_irqs = [k for k in want.knobs if k.group == "irq" and "→ shard CPU" in k.why]
    assert queue_irqs, f"no queue IRQs found for {[n.name for n in want.nics]}"

    def adpop(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", "tune", *args,
                               "--config", str(config)], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=False)

    try:
        applied = adpop("apply")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        verify = adpop("verify")
        assert verify.returncode == 0, verify.stdout
        node0 = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages")
        assert int(node0.read_text()) >= 32
        for knob in queue_irqs:
            assert knob.current() == "1", knob.name
    finally:
        rolled = adpop("rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert raw_values(want.knobs) == before
    assert Path("/dev/hugepages").exists() == had_mount_point


# --- drift ---------------------------------------------------------------------------------


def watcher_on(tree: Tree, repair: Any = None, applied: Any = None) -> Any:
    from appliance.tuning.drift import DriftWatcher

    appliance = cfg.load(cfg.Scope.APPLIANCE, tree.config)
    host = Host(tree.root)

    async def apply_to_tree() -> str:
        outcomes = await asyncio.to_thread(plan.apply, appliance, host)
        return f"{len(outcomes)} written"

    return DriftWatcher(appliance, repair or apply_to_tree, host=host, applied=applied)


def test_first_check_waits_for_the_boots_tuning(make_tree: Any) -> None:
    """The supervisor starts beside adpop-tune: a check before it finished would see every
    knob as drift and restart the tuning in the middle of its run."""
    tree = make_tree('[tuning]\ndrift_interval = "1h"', **VIRTIO)
    tuned = asyncio.Event()

    async def applied() -> None:
        await tuned.wait()

    async def apply_tree() -> None:
        appliance = cfg.load(cfg.Scope.APPLIANCE, tree.config)
        await asyncio.to_thread(plan.apply, appliance, Host(tree.root))
        tuned.set()

    repairs: list[str] = []

    async def repair() -> str:
        repairs.append("called")
        return ""

    watcher = watcher_on(tree, repair, applied)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(watcher.run(stop))
        try:
            await asyncio.sleep(0.3)
            assert watcher.checks == 0 and watcher.status()["last_reason"] == (
                "waiting for the boot's tuning")
            await apply_tree()
            await until("the first check", lambda: watcher.checks, watcher.status)
            assert watcher.checks == 1 and watcher.drifting == []
        finally:
            stop.set()
            await task

    asyncio.run(scenario())
    assert not repairs, "the tuning the boot applied is not drift"


def test_drift_is_counted_and_repaired_at_a_bounded_rate(make_tree: Any) -> None:
    tree = make_tree('[engine]\nshards = 1\ncpus = "1"\n[tuning]\nrepairs_per_hour = 1',
                     **VIRTIO)
    watcher = watcher_on(tree)

    async def scenario() -> None:
        assert "sysctl vm.swappiness" in await watcher.check("start")  # untuned tree
        assert watcher.repaired == 1
        assert await watcher.check("interval") == []  # the repair took
        (tree.root / "proc/sys/vm/swappiness").write_text("60\n")  # someone undoes it
        assert await watcher.check("interval") == ["sysctl vm.swappiness"]
        assert watcher.skipped == 1, "one repair per hour: the second drift is not fought"

    asyncio.run(scenario())
    status = watcher.status()
    assert status["drift"]["sysctl vm.swappiness"] == 2 and status["repairs"] == 1
    assert status["drifting"] == ["sysctl vm.swappiness"]
    assert tree.adpop("verify").returncode == 1


def test_a_veth_pair_in_a_namespace_raises_the_drift_check(make_tree: Any) -> None:
    """Kernel uevents (pyudev, no udevd) for a veth pair the test makes and deletes."""
    tree = make_tree('[tuning]\nrepairs_per_hour = 0\ndrift_interval = "1h"', **VIRTIO)
    repairs: list[str] = []

    async def no_repair() -> str:
        repairs.append("called")
        return ""

    watcher = watcher_on(tree, no_repair)
    namespace, outer = f"adpop-drift-{os.getpid()}", f"adpd{os.getpid() % 100000}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(watcher.run(stop))
        try:
            await until("the first check", lambda: watcher.checks == 1, watcher.status)
            ip("netns", "add", namespace)
            ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            await until("a check after the veth appeared", lambda: watcher.checks == 2,
                        watcher.status)
            assert watcher.last_reason == "device event" and watcher.udev_events >= 1
            ip("link", "del", outer)
            await until("a check after the veth went", lambda: watcher.checks == 3,
                        watcher.status)
            assert watcher.last_reason == "device event"
        finally:
            stop.set()
            await task

    try:
        asyncio.run(scenario())
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
    assert not repairs, "repairs_per_hour = 0 never repairs"
    assert watcher.skipped == 3  # the untuned tree drifted at every check


def test_one_gigabyte_pages_round_up_per_node(make_tree: Any) -> None:
    tree = make_tree('[engine]\nshards = 3\ncpus = "0-2"\n[tuning]\nhugepage_size = "1G"\n'
                     'hugepages_per_shard = "600MiB"', cpus=4, nodes=2,
                     nics=[FakeNic("eth0", "virtio", 1)])
    knobs = tree.plan()
    assert knobs["hugepages node0 1G"]["desired"] == "2"  # 2 shards x 600 MiB
    assert knobs["hugepages node1 1G"]["desired"] == "1"
    assert knobs["hugetlbfs /dev/hugepages1G"]["desired"] == "mounted"
    assert "hugepages=0:2,1:1" in tree.adpop("cmdline").stdout
