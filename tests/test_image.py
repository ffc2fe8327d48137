"""The appliance image: built by `make image` (reused when nothing changed), its tree checked
by systemd-analyze and booted in systemd-nspawn (fast tier), flashed onto loop devices, and
booted under qemu with OVMF (boot tier) against an origin running on this host."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from images import boot, build

REPO = Path(__file__).resolve().parent.parent
TREE = build.OUT / "work" / "tree"


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    manifest = build.build()
    manifest["path"] = build.OUT / manifest["image"]
    return manifest


@pytest.mark.image
def test_manifest_and_reuse(image: dict[str, Any]) -> None:
    raw = image["path"]
    assert image["sha256"] == build.sha256_file(raw)
    assert (build.OUT / image["zstd"]).stat().st_size < raw.stat().st_size
    assert "systemd.firstboot=off" in image["kernel_cmdline"]
    assert "transparent_hugepage=" in image["kernel_cmdline"]  # from `adpop tune cmdline`
    # The default configuration pins no shard, so the image isolates none of the CPUs of
    # whatever server it boots on.
    assert "isolcpus" not in image["kernel_cmdline"]
    again = build.build()
    assert again["reused"] and again["sha256"] == image["sha256"]


@pytest.mark.image
def test_tree_units_verify(image: dict[str, Any]) -> None:
    units = ["adpop.target", "adpop-tune.service", "adpop-xdp.service", "adpop-engine.service",
             "adpop-supervisor.service", "adpop-redis.service", "dragonfly.service"]
    result = subprocess.run(["systemd-analyze", "verify", f"--root={TREE}", *units],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if "adpop" in line or "dragonfly"
                in line]
    assert not problems, problems


@pytest.mark.image
def test_blocklisted_modules_exist_in_the_image_kernel(image: dict[str, Any]) -> None:
    # A misspelt name in modprobe.d is silently ignored: each must name a module of the
    # kernel the image boots (modprobe reads - and _ alike).
    conf = (TREE / "usr/lib/modprobe.d/adpop.conf").read_text()
    names = [line.split()[1] for line in conf.splitlines() if line.startswith("blacklist ")]
    assert names
    [dep] = TREE.glob("lib/modules/*/modules.dep")
    modules = {Path(line.split(":", 1)[0]).name.split(".ko")[0].replace("-", "_")
               for line in dep.read_text().splitlines()}
    assert [name for name in names if name.replace("-", "_") not in modules] == []


def container_init(nspawn: subprocess.Popen[bytes]) -> int:
    """The container's systemd. nspawn's first child is a set-up process that exits once
    the container's init runs: waiting for a child that is systemd itself (nspawn is the
    subreaper of both) keeps nsenter from targeting the set-up process, which it did on a
    loaded machine."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in subprocess.run(["pgrep", "-P", str(nspawn.pid)], capture_output=True,
                                  text=True, check=False).stdout.split():
            with contextlib.suppress(FileNotFoundError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError("nspawn started no init")


@pytest.mark.image
def test_nspawn_boot_brings_up_adpop_target(image: dict[str, Any], tmp_path: Path) -> None:
    """Fast tier: the tree boots in a container; adpop.target comes up, no unit fails, and
    the PoP (no origin, no keys) says what it is missing."""
    drop_in = tmp_path / "90-test.toml"
    drop_in.write_text('[supervisor]\nready_timeout = "5s"\n')
    log = open(tmp_path / "nspawn.log", "wb")  # noqa: SIM115 - closed below
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "--boot", "-D", str(TREE), "--volatile=overlay", "--register=no",
         "--keep-unit", "--console=read-only", "--private-network",
         f"--bind-ro={drop_in}:/etc/adpop/appliance.d/90-test.toml"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        init = container_init(nspawn)

        def inside(*argv: str) -> str:
            return subprocess.run(["nsenter", "-t", str(init), "-a", *argv],
                                  capture_output=True, text=True, timeout=60,
                                  check=False).stdout.strip()

        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            state = inside("systemctl", "is-system-running")
            if state in ("running", "degraded") and \
                    inside("systemctl", "is-active", "adpop.target") == "active":
                break
            time.sleep(0.5)
        failed = inside("systemctl", "--failed", "--no-legend")
        assert state == "running" and not failed, f"{state}: {failed}"
        active = inside("systemctl", "is-active", "adpop-supervisor", "adpop-redis")
        assert active.split() == ["active", "active"]
        masked = inside("systemctl", "is-enabled", *build.SELF_MAINTENANCE)
        assert masked.split() == ["masked"] * len(build.SELF_MAINTENANCE)
        # The generator ran at boot: the cache's memory ceiling comes from its drop-in.
        limit = inside("systemctl", "show", "-p", "MemoryMax", "--value", "adpop-redis")
        assert limit.isdigit(), f"adpop-redis MemoryMax={limit}: the generator wrote nothing"
        # ... and systemd execs the cache server itself, with the configuration's flags.
        exec_start = inside("systemctl", "show", "-p", "ExecStart", "--value", "adpop-redis")
        assert "path=/usr/bin/redis-server ;" in exec_start, exec_start
        # Its password file comes as the unit's credential, never the password itself.
        assert ("argv[]=/usr/bin/redis-server /run/credentials/adpop-redis.service/"
                "cache.redis.conf --bind 127.0.0.1 --port 6379 ") in exec_start, exec_start
        assert "NOAUTH" in inside("redis-cli", "ping")  # no password, no cache
        modes = inside("stat", "-c", "%a %U", "/var/lib/adpop/secrets/cache.password",
                       "/var/lib/adpop/secrets/cache.redis.conf")
        assert modes.splitlines() == ["600 root", "600 root"], modes
        # The supervisor computes the same drop-ins from the same configuration: no reload.
        journal = inside("journalctl", "-u", "adpop-supervisor", "--no-pager", "-o", "cat")
        assert "configuration changed" not in journal, journal
        status = inside("/usr/bin/adpop", "status")
        assert "no trusted root.json" in status and "cache    ok" in status
    finally:
        nspawn.send_signal(signal.SIGTERM)
        try:
            nspawn.wait(30)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait()
        log.close()


# --- flash, on loop devices this test makes -------------------------------------------------


class Loop:
    def __init__(self, backing: Path, size: int) -> None:
        with open(backing, "wb") as fh:
            fh.truncate(size)
        self.backing = backing
        self.device = subprocess.run(["losetup", "-P", "-f", "--show", str(backing)],
                                     capture_output=True, text=True, check=True).stdout.strip()

    def close(self) -> None:
        subprocess.run(["losetup", "-d", self.device], capture_output=True, check=False)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Any]:
    made: list[Loop] = []

    def make(size: int) -> Loop:
        loop = Loop(tmp_path / f"disk{len(made)}.img", size)
        made.append(loop)
        return loop

    yield make
    for loop in made:
        loop.close()


def adpop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)


def debugfs_cat(device: str, path: str, command: str = "cat") -> str:
    table = json.loads(subprocess.run(["sfdisk", "-J", device], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    start = next(p["start"] for p in table["partitions"] if p.get("name") == "root") * 512
    return subprocess.run(["debugfs", "-R", f"{command} {path}", f"{device}?offset={start}"],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.image
def test_flash_writes_verifies_and_configures(image: dict[str, Any], loops: Any,
                                              tmp_path: Path) -> None:
    from appliance.origin.tuf_repo import Repository

    root = Repository.open(tmp_path / "tuf").metadata / "root.json"
    config = boot.site_config(tmp_path, root)
    token = tmp_path / "enroll-token"
    token.write_text(f"adpop-enroll-{'x' * 43}.{'ab' * 32}\n")
    token.chmod(0o600)
    loop = loops(image["bytes"] + 8 * 2**20)
    result = adpop("flash", str(image["path"]), "--device", loop.device, "--config",
                   str(config), "--enrollment-token", str(token), "--yes")
    assert result.returncode == 0, result.stderr
    assert f"verified sha256 {image['sha256'][:16]}" in result.stdout
    theirs = json.loads(subprocess.run(["sfdisk", "-J", loop.device], capture_output=True,
                                       text=True, check=True).stdout)["partitiontable"]
    ours = json.loads(subprocess.run(["sfdisk", "-J", str(image["path"])], capture_output=True,
                                     text=True, check=True).stdout)["partitiontable"]
    assert [(p["start"], p["size"], p["type"]) for p in theirs["partitions"]] == \
        [(p["start"], p["size"], p["type"]) for p in ours["partitions"]]
    assert "did not re-read the partition table" not in result.stderr
    site = debugfs_cat(loop.device, "/etc/adpop/appliance.d/50-site.toml")
    assert 'id = "pop-vm-1"' in site and "trust" not in site
    assert debugfs_cat(loop.device, "/var/lib/adpop/trust/root.json") == root.read_text()
    # The token where the PoP looks for it at first boot, readable by root only.
    assert debugfs_cat(loop.device, "/var/lib/adpop/enroll-token") == token.read_text()
    assert "Mode:  0600" in debugfs_cat(loop.device, "/var/lib/adpop/enroll-token", "stat")


def digest(path: str, size: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(size)).hexdigest()


@pytest.mark.image
def test_flash_refusals_write_nothing(image: dict[str, Any], loops: Any,
                                     tmp_path: Path) -> None:
    from appliance.flash import FlashError, flash

    small = loops(image["bytes"] // 2)
    big = loops(image["bytes"] + 8 * 2**20)
    before = {d.device: digest(d.device, 2**20) for d in (small, big)}

    def refused(message: str, device: str, **kwargs: Any) -> None:
        with pytest.raises(FlashError, match=message):
            flash(image["path"], device, **kwargs)

    refused("less than the image", small.device, yes=True)
    refused("not confirmed: typed 'sdz', not", big.device, ask=lambda _: "sdz")
    refused("is not a block device", str(image["path"]), yes=True)
    refused("No such file or directory", "/dev/nosuchdisk", yes=True)
    root = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True,
                          text=True, check=True).stdout.strip()
    refused("is a partition|holds the running system's root", root, yes=True)
    bad = tmp_path / "bad.toml"
    bad.write_text('[pop]\nid = "Not Valid!"\n')
    refused("--config", big.device, yes=True, config=bad)
    loose = tmp_path / "enroll-token"
    loose.write_text(f"adpop-enroll-{'x' * 43}.{'ab' * 32}\n")
    loose.chmod(0o644)
    refused("readable by others", big.device, yes=True, enrollment_token=loose)
    # A disk with a mounted file system (on the whole disk: this kernel makes no partition
    # devices for loop disks).
    subprocess.run(["mkfs.ext4", "-q", big.device], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", big.device, str(mnt)], check=True)
    try:
        marked = digest(big.device, 2**20)
        refused("has mounted partitions", big.device, yes=True)
        assert digest(big.device, 2**20) == marked
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert digest(small.device, 2**20) == before[small.device]


# --- boot tier: UEFI under qemu (TCG) against an origin on this host -------------------------


@pytest.mark.vm
def test_uefi_boot_serves_an_ad(image: dict[str, Any], tmp_path: Path) -> None:
    """Boot tier: UEFI under qemu, the origin reached only through a guestfwd."""
    booted = boot.boot_and_serve(image["path"], image["bytes"], tmp_path)
    assert booted.answer["placements"][0]["ads"], booted.answer
    # adpop-banner.service: the supervisor's status, then systemctl --failed, on the console.
    assert "pop-vm-1: ready - serving v1" in booted.serial, booted.serial[-2000:]
    assert "0 loaded units listed" in booted.serial, booted.serial[-2000:]
    failed = [line for line in booted.serial.splitlines() if "FAILED" in line]
    assert not failed, failed
    # modprobe.d/adpop.conf: udev loaded no Wi-Fi stack for the board (it logs its keys).
    assert "cfg80211" not in booted.serial
    # The console watch saw the firmware hand over, then the kernel, before the PoP served.
    assert 0 < booted.phases["kernel"] < booted.phases["systemd"] < booted.serving_after_s
    print(f"boot to serving: {booted.serving_after_s:.1f} s ({booted.phases})")
