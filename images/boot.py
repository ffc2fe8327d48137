"""Boot the appliance disk under qemu (TCG unless ADPOP_QEMU_ACCEL says otherwise) with OVMF,
a user-mode NIC with restrict=on, the engine's port forwarded on 127.0.0.1 and the origin
reachable only through a guestfwd (a relay process per guest connection, to 127.0.0.1);
for the boot test and the benchmark. qemu is killed
whatever happens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.up import SAMPLE_CAMPAIGNS, free_port, prepare, root_json

REPO = Path(__file__).resolve().parent.parent
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
GUEST_HOST = "10.0.2.100"  # the origin as the guest sees it (a guestfwd to this host)
GUEST_ORIGIN = f"https://{GUEST_HOST}:8700"
GUEST_POP = "pop-vm-1"
BOOT_WAIT = 240.0
READY_MARK = "loaded units listed"  # adpop-banner.service's last line on the console
# Console lines that end each phase of a boot, timed from power-on by the host's clock:
# the firmware hands over to the kernel, the kernel (and initrd) to systemd.
PHASES = {"kernel": "Linux version", "systemd": "systemd[1]"}


class BootError(Exception):
    pass


@dataclass
class Booted:
    serving_after_s: float
    answer: dict[str, Any]
    serial: str
    # PHASES' names -> seconds from power-on at which the console first showed them.
    phases: dict[str, float] = field(default_factory=dict)


class ConsoleWatch:
    """Polls the serial log in a thread, noting when each of PHASES first appears."""

    def __init__(self, serial: Path, started: float) -> None:
        self.serial, self.started = serial, started
        self.seen: dict[str, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(0.1) and len(self.seen) < len(PHASES):
            text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
            for name, mark in PHASES.items():
                if name not in self.seen and mark in text:
                    self.seen[name] = time.monotonic() - self.started

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.thread.join()
        return dict(self.seen)


def site_config(folder: Path, root: Path, origin_url: str = GUEST_ORIGIN) -> Path:
    config = folder / "site.toml"
    config.write_text(f'[pop]\nid = "{GUEST_POP}"\n[sync]\norigin_url = "{origin_url}"\n'
                      f'push_listen = ""\npoll_interval = "3s"\nhealth_window = "2s"\n'
                      f'[snapshot]\ntrust_root = "{root}"\n')
    return config


def flashed_copy(image: Path, size: int, folder: Path, config: Path,
                 token: Path | None = None) -> Path:
    """The image written by `adpop flash --config [--enrollment-token]` onto a loop device
    over a file."""
    disk = folder / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(size)
    loop = subprocess.run(["losetup", "-P", "-f", "--show", str(disk)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        token_args = ["--enrollment-token", str(token)] if token else []
        result = subprocess.run([sys.executable, "-m", "appliance.cli", "flash", str(image),
                                 "--device", loop, "--config", str(config), *token_args,
                                 "--yes"],
                                cwd=REPO, capture_output=True, text=True, check=False)
        if result.returncode:
            raise BootError(f"flash failed: {result.stderr.strip()[-500:]}")
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    return disk


def boot_and_serve(image: Path, size: int, folder: Path) -> Booted:
    """An origin on this host with the sample campaigns, the image flashed with a site
    config pointing at it, a UEFI boot; returns when POST /v1/decide gave an ad."""
    origin_toml, _, ports = prepare(folder / "origin-side", SAMPLE_CAMPAIGNS, free_port(),
                                    origin_hosts=[GUEST_HOST])
    root = root_json(folder / "origin-side" / "origin")
    # The flashed PoP enrolls itself at first boot with a token made for it here.
    token = folder / "enroll-token"
    subprocess.run([sys.executable, "-m", "appliance.cli", "origin", "pops", "enroll",
                    GUEST_POP, "--out", str(token), "--config", str(origin_toml)], cwd=REPO,
                   check=True, capture_output=True)
    origin = subprocess.Popen([sys.executable, "-m", "appliance.cli", "origin", "serve",
                               "--config", str(origin_toml)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qemu = None
    watch: ConsoleWatch | None = None
    try:
        disk = flashed_copy(image, size, folder, site_config(folder, root), token)
        vars_copy = folder / "OVMF_VARS.fd"
        shutil.copy2(OVMF_VARS, vars_copy)
        port, serial = free_port(), folder / "serial.log"
        accel = os.environ.get("ADPOP_QEMU_ACCEL", "tcg")
        started = time.monotonic()
        qemu = subprocess.Popen([
            "qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-m", "1024",
            "-smp", "2",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
            "-drive", f"file={disk},format=raw,if=virtio",
            "-nic", f"user,model=virtio-net-pci,restrict=on,"
                    f"hostfwd=tcp:127.0.0.1:{port}-:8080,"
                    f"guestfwd=tcp:10.0.2.100:8700-cmd:{sys.executable} -m images.relay "
                    f"127.0.0.1 {ports['origin']}",
            "-serial", f"file:{serial}", "-display", "none", "-no-reboot"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        watch = ConsoleWatch(serial, started)
        body = json.dumps({"id": "vm", "placements": [{"id": "article-inline"}],
                           "geo": {"country": "US"}}).encode()
        answer: dict[str, Any] = {}
        while time.monotonic() - started < BOOT_WAIT and not answer:
            if qemu.poll() is not None:
                raise BootError(f"qemu exited with {qemu.returncode}")
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/decide",
                                                 data=body, method="POST")
                with urllib.request.urlopen(request, timeout=5) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        serving = time.monotonic() - started
        phases = watch.stop()
        if not answer:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            raise BootError(f"not serving after {BOOT_WAIT:.0f} s:\n{text[-3000:]}")
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:  # the console's report follows READY
            text = serial.read_text(errors="replace")
            if READY_MARK in text:
                break
            time.sleep(0.5)
        return Booted(serving, answer, text, phases)
    finally:
        if watch is not None:
            watch.stop()
        if qemu is not None:
            qemu.kill()
            qemu.wait()
        origin.terminate()
        origin.wait(30)
