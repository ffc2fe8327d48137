"""`adpop flash IMAGE --device DEV [--config FILE] [--yes]`: the appliance image onto a disk.

Without a device it lists the candidate disks (pyudev: model, serial, size, removable,
mounted partitions). It refuses, in one line and before writing anything: a device that is
not a whole-disk block device, the disk holding the running root, a disk with a mounted
partition, a disk smaller than the image, and (without --yes) a device name the operator did
not type back. It writes with a progress line, reads the written bytes back and compares
SHA-256, puts the operator's configuration drop-in (with the origin's TUF root.json it names)
and an enrollment token into the image's root file system with debugfs (no mount), and
re-reads the partition table.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyudev
import tomlkit

from appliance import config as cfg
from appliance.errors import AdpopError

BLKGETSIZE64 = 0x80081272
BLKRRPART = 0x125F
CHUNK = 4 * 1024 * 1024
DROP_IN = "/etc/adpop/appliance.d/50-site.toml"
TRUST_DIR = "/var/lib/adpop/trust"
ROOT_NAME = "root.json"  # in TRUST_DIR: the default snapshot.trust_root


class FlashError(AdpopError):
    """The flash was refused or failed."""


@dataclass(frozen=True)
class Disk:
    path: str
    model: str
    serial: str
    size: int
    removable: bool
    mounted: tuple[str, ...]  # "partition on mountpoint"
    refused: str = ""  # why flash would refuse this disk ("" when it would write it)


def _mounts() -> dict[tuple[int, int], str]:
    """(major, minor) → mount point, from this process's mountinfo."""
    found: dict[tuple[int, int], str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        major, minor = fields[2].split(":")
        found.setdefault((int(major), int(minor)), fields[4])
    return found


def _root_disk(context: pyudev.Context) -> str | None:
    """The whole disk whose partition (or itself) holds the running root."""
    root = os.stat("/").st_dev
    try:
        device = pyudev.Devices.from_device_number(context, "block", root)
    except pyudev.DeviceNotFoundError:
        return None
    disk = device.find_parent("block", "disk") if device.device_type == "partition" else device
    return str(disk.device_node) if disk is not None else None


def describe(device: pyudev.Device, mounts: dict[tuple[int, int], str]) -> Disk:
    """The disk as the listing and the refusals show it; `mounts` from _mounts()."""
    mounted = []
    for part in [device, *device.children]:
        key = (os.major(part.device_number), os.minor(part.device_number))
        if part.subsystem == "block" and key in mounts:
            mounted.append(f"{part.device_node} on {mounts[key]}")
    size = device.attributes.asint("size") * 512
    removable = device.attributes.get("removable", b"0") == b"1"
    props = device.properties
    return Disk(str(device.device_node), str(props.get("ID_MODEL", "") or ""),
                str(props.get("ID_SERIAL_SHORT", "") or ""), size, removable, tuple(mounted))


def candidates() -> list[Disk]:
    """Whole disks that could take the image (not loop, RAM or device-mapper devices), each
    marked with the refusal flash would give it: the listing never offers the root disk."""
    context = pyudev.Context()
    skip = ("loop", "ram", "zram", "dm-", "sr", "md")
    mounts = _mounts()  # read once for every disk
    root = _root_disk(context)
    disks = []
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        if str(device.sys_name).startswith(skip):
            continue
        disk = describe(device, mounts)
        disks.append(dataclasses.replace(disk, refused=refusal(disk, root)[0]))
    return disks


def refusal(disk: Disk, root: str | None) -> tuple[str, str]:
    """Why flash will not write this disk, and the fix; ("", "") when it will. The listing
    and check_target give the same answer from here."""
    if disk.path == root:
        return "holds the running system's root file system", "flash another disk"
    if disk.mounted:
        return f"has mounted partitions ({', '.join(disk.mounted)})", "unmount them first"
    return "", ""


def check_target(device_path: str, image_bytes: int) -> Disk:
    """The disk to write, or FlashError with the reason; nothing is written here."""
    try:
        mode = os.stat(device_path).st_mode
    except OSError as exc:
        raise FlashError(f"{device_path}: {exc.strerror}",
                         hint="`adpop flash IMAGE` lists the disks") from exc
    if not stat.S_ISBLK(mode):
        raise FlashError(f"{device_path} is not a block device", hint="give a disk, e.g. /dev/sdb")
    context = pyudev.Context()
    device = pyudev.Devices.from_device_file(context, device_path)
    if device.device_type != "disk":
        parent = device.find_parent("block", "disk")
        raise FlashError(f"{device_path} is a partition, not a whole disk",
                         hint=f"give {parent.device_node if parent else 'the disk'}")
    disk = describe(device, _mounts())
    why, fix = refusal(disk, _root_disk(context))
    if why:
        raise FlashError(f"{device_path} {why}", hint=fix)
    with open(device_path, "rb") as fh:
        size = int.from_bytes(fcntl.ioctl(fh, BLKGETSIZE64, b"\0" * 8), "little")
    if size < image_bytes:
        raise FlashError(f"{device_path} holds {size:,} bytes, less than the image's "
                         f"{image_bytes:,}", hint="use a larger disk")
    return disk


@dataclass(frozen=True)
class SiteConfig:
    """The operator's drop-in, checked, with the origin keys it names."""

    text: str
    keys: dict[str, bytes]  # file name in TRUST_DIR → contents (the TUF root.json)
    token_path: str  # where on the appliance the PoP looks for its enrollment token


@dataclass(frozen=True)
class Token:
    """A one-time enrollment token for the image: the PoP enrolls with it at first boot."""

    text: str

    @classmethod
    def read(cls, path: Path) -> Token:
        from appliance import secrets
        from appliance.origin.ca import split
        from appliance.origin.enroll import TOKEN_PREFIX

        try:
            text = secrets.read(path, "--enrollment-token")
        except secrets.SecretError as exc:
            raise FlashError(exc.message, hint=exc.hint) from exc
        secret, pinned = split(text)
        if not secret.startswith(TOKEN_PREFIX) or len(pinned) != 64:
            raise FlashError(f"--enrollment-token {path} holds no enrollment token that "
                             "pins the origin's CA",
                             hint="make one with `adpop origin pops enroll NAME --out FILE`")
        return cls(text)


def site_config(path: Path) -> SiteConfig:
    """Checks the drop-in as the appliance will read it; takes the origin's TUF root.json it
    names (snapshot.trust_root) for the image's trust folder."""
    from appliance.sync.trust import TrustError, check_root

    try:
        layered = cfg.load(cfg.Scope.APPLIANCE, path)
    except cfg.ConfigError as exc:
        raise FlashError(f"--config {path}: {exc.message}", hint=exc.hint) from exc
    keys: dict[str, bytes] = {}
    text = path.read_text()
    document = tomlkit.parse(text)
    snapshot = document.get("snapshot")
    if isinstance(snapshot, dict) and "trust_root" in snapshot:
        entry = layered.snapshot.trust_root
        source = (path.parent / entry) if not Path(entry).is_absolute() else Path(entry)
        if not source.is_file():
            raise FlashError(f"--config {path}: trusted root {source} does not exist",
                             hint="name the origin's root.json in snapshot.trust_root "
                                  "(`adpop origin keys init` prints where it is)")
        try:
            check_root(source.read_bytes(), str(source))  # only what the PoP will accept
        except TrustError as exc:
            raise FlashError(f"--config {path}: {exc.message}", hint=exc.hint) from exc
        keys[ROOT_NAME] = source.read_bytes()
        # On the appliance the root sits where the default says, so the drop-in's own
        # snapshot.trust_root goes; tomlkit edits the document and keeps every comment and
        # the layout of the rest.
        del snapshot["trust_root"]
        text = tomlkit.dumps(document)
    token_path = str(cfg.under(layered.paths.state_dir, layered.sync.enrollment_token_file))
    return SiteConfig(text, keys, token_path)


def _root_offset(device_path: str) -> int:
    table = json.loads(subprocess.run(["sfdisk", "-J", device_path], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    root = next(p for p in table["partitions"] if p.get("name") == "root")
    return int(root["start"]) * int(table.get("sectorsize", 512))


def _debugfs(target: str, command: str) -> None:
    result = subprocess.run(["debugfs", "-w", "-R", command, target], capture_output=True,
                            text=True, check=False)
    if result.returncode or "error" in result.stderr.lower().replace("errors", ""):
        raise FlashError(f"debugfs {command!r}: {result.stderr.strip()}")


def write_site(device_path: str, site: SiteConfig, token: Token | None = None) -> None:
    target = f"{device_path}?offset={_root_offset(device_path)}"
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "site.toml"
        staged.write_text(site.text)
        _debugfs(target, f"write {staged} {DROP_IN}")
        for name, data in site.keys.items():
            key = Path(tmp) / name
            key.write_bytes(data)
            _debugfs(target, f"write {key} {TRUST_DIR}/{name}")
        if token is not None:
            staged = Path(tmp) / "enroll-token"
            staged.write_text(token.text + "\n")
            _debugfs(target, f"write {staged} {site.token_path}")
            # Readable by root only, as the supervisor's secrets.read insists.
            _debugfs(target, f"set_inode_field {site.token_path} mode 0100600")


_last_progress = [0.0]


def _progress(label: str, done: int, total: int, started: float) -> None:
    now = time.monotonic()
    if done < total and now - _last_progress[0] < 0.25:
        return  # a few updates a second are enough for a person
    _last_progress[0] = now
    rate = done / max(time.monotonic() - started, 1e-6) / 2**20
    print(f"\r{label}: {done * 100 // max(total, 1):3d}% {done / 2**20:,.0f}/"
          f"{total / 2**20:,.0f} MiB {rate:,.0f} MiB/s", end="", file=sys.stderr, flush=True)


def flash(image: Path, device_path: str, config: Path | None = None, yes: bool = False,
          ask: Callable[[str], str] = input, enrollment_token: Path | None = None
          ) -> dict[str, Any]:
    if not image.is_file():
        raise FlashError(f"image {image} does not exist", hint="`make image` builds one")
    total = image.stat().st_size
    token = Token.read(enrollment_token) if enrollment_token else None
    site = site_config(config) if config else None
    if token is not None and site is None:
        raise FlashError("--enrollment-token needs --config: the token enrolls the PoP the "
                         "site configuration names, at the origin it names",
                         hint="give --config FILE with [pop] id and [sync] origin_url")
    check_target(device_path, total)
    if not yes:
        name = Path(device_path).name
        answer = ask(f"Everything on {device_path} will be erased. Type {name} to write: ")
        if answer.strip() != name:
            raise FlashError(f"not confirmed: typed {answer.strip()!r}, not {name!r}",
                             hint="type the device name exactly, or pass --yes")
    digest = hashlib.sha256()
    started = time.monotonic()
    with open(image, "rb") as src, open(device_path, "r+b", buffering=0) as dst:
        done = 0
        while block := src.read(CHUNK):
            digest.update(block)
            dst.write(block)
            done += len(block)
            _progress("writing", done, total, started)
        os.fsync(dst.fileno())
    print(file=sys.stderr)
    # Read back what the device now holds, past the page cache.
    subprocess.run(["blockdev", "--flushbufs", device_path], check=False)
    check = hashlib.sha256()
    with open(device_path, "rb") as fh:
        left = total
        while left:
            block = fh.read(min(CHUNK, left))
            if not block:
                break
            check.update(block)
            left -= len(block)
            _progress("verifying", total - left, total, started)
    print(file=sys.stderr)
    if check.hexdigest() != digest.hexdigest():
        raise FlashError(f"{device_path} reads back differently from {image} "
                         f"({check.hexdigest()[:16]} vs {digest.hexdigest()[:16]})",
                         hint="the disk may be failing; try another")
    if site is not None:
        write_site(device_path, site, token)
    with open(device_path, "rb") as fh:
        try:
            fcntl.ioctl(fh, BLKRRPART)
        except OSError as exc:
            print(f"note: the kernel did not re-read the partition table ({exc.strerror})",
                  file=sys.stderr)
    return {"device": device_path, "bytes": total, "sha256": digest.hexdigest(),
            "config": str(config) if config else None,
            "keys": sorted(site.keys) if site else [],
            "enrollment_token": site.token_path if site and token else None,
            "seconds": round(time.monotonic() - started, 1)}
