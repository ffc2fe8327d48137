"""`make image`: the adpop appliance disk, images/out/adpop-<version>.raw (GPT, UEFI,
systemd-boot), Debian bookworm with the generic kernel, from Debian's packages only.

No loop devices and no mounts of the disk (this host has no vfat): the tree is made by
debootstrap and apt in a chroot inside `unshare --mount`; `mkfs.ext4 -d` fills the root file
system, `mkfs.vfat -C` and mtools the ESP, sfdisk writes the GPT and dd places both. The base
tree (Debian packages) is cached by its package list; the whole image is reused when no input
changed. Beside the image: a manifest (version, SHA-256, size, inputs) and a zstd copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT, CACHE = REPO / "images" / "out", REPO / "images" / "cache"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
# initramfs-tools and zstd go in before the kernel, so its postinst builds the initrd.
FIRST_PACKAGES = ["initramfs-tools", "zstd"]
PACKAGES = ["linux-image-amd64", "systemd", "systemd-sysv", "systemd-boot-efi", "udev", "dbus",
            "python3", "python3-venv", "redis-server", "libcapnp-0.9.2", "libssl3", "libbpf1",
            "iproute2", "kmod", "ca-certificates", "netbase", "procps"]
SELF_MAINTENANCE = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
                    "e2scrub_all.timer", "e2scrub_reap.service"]
ESP_MIB = 192
ALIGN = 1024 * 1024
IMAGE_CONFIG = """# Written by `make image`: the appliance's own settings. Machine identity (PoP id,
# origin URL, the origin's TUF root) comes from the operator's drop-in (adpop flash --config).
[engine]
listen = "0.0.0.0:8080"

[supervisor]
mode = "appliance"
"""
NETWORK = """[Match]
Name=en* eth*

[Network]
DHCP=yes
"""
INPUT_GLOBS = ["appliance/**/*.py", "appliance/**/*.capnp", "appliance/xdp/*.c",
               "appliance/xdp/*.h", "units/**/*", "config/**/*", "tui/**/*.py", "tui/**/*.tcss",
               "images/*.py", "pyproject.toml", "engine/src/*", "engine/CMakeLists.txt"]


class BuildError(Exception):
    pass


def run(*argv: str, **kwargs: Any) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode:
        raise BuildError(f"{' '.join(argv[:6])}... failed: {result.stderr.strip()[-800:]}")
    return str(result.stdout)


def log(message: str) -> None:
    print(f"image: {message}", flush=True)


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inputs(dragonfly: Path | None) -> dict[str, Any]:
    """Every input of the image, hashed: an unchanged set reuses the last build."""
    files = sorted({p for g in INPUT_GLOBS for p in REPO.glob(g)
                    if p.is_file() and "__pycache__" not in p.parts})
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    built = {name: sha256_file(REPO / name) for name in
             ("engine/build/adpop-engine", "appliance/xdp/build/filter.bpf.o")}
    return {"sources_sha256": digest.hexdigest(), "source_files": len(files), **built,
            "packages": FIRST_PACKAGES + PACKAGES,
            "dragonfly_deb_sha256": sha256_file(dragonfly) if dragonfly else None}


# --- the tree -------------------------------------------------------------------------------


def chroot_script(tree: Path, script: str) -> None:
    """`script` in the tree as root, with proc, sys and dev mounted in a private namespace."""
    wrapped = f"""set -e
mount -t proc proc {tree}/proc
mount -t sysfs sys {tree}/sys
mount --rbind /dev {tree}/dev
chroot {tree} /bin/sh -e -c '{script}'
"""
    run("unshare", "--mount", "--propagation", "private", "sh", "-c", wrapped,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})


def base_tree(tree: Path) -> None:
    """debootstrap plus the packages, from the cache when its package list is the same."""
    key = hashlib.sha256(json.dumps(FIRST_PACKAGES + PACKAGES).encode()).hexdigest()[:16]
    cached = CACHE / f"base-{key}.tar"
    if cached.exists():
        log(f"base tree from cache {cached.name}")
        run("tar", "-xf", str(cached), "-C", str(tree), "--numeric-owner")
        return
    log("debootstrap bookworm")
    run("debootstrap", "--variant=minbase", "bookworm", str(tree), MIRROR)
    (tree / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} bookworm main\ndeb {MIRROR} bookworm-updates main\n"
        f"deb {SECURITY} bookworm-security main\n")
    # No service starts inside the build chroot.
    (tree / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    (tree / "usr/sbin/policy-rc.d").chmod(0o755)
    log("apt: " + " ".join(FIRST_PACKAGES + PACKAGES))
    chroot_script(tree, "apt-get update -qq && "
                  f"apt-get install -y -qq --no-install-recommends {' '.join(FIRST_PACKAGES)} && "
                  f"apt-get install -y -qq --no-install-recommends {' '.join(PACKAGES)} && "
                  "rm -f /var/cache/apt/archives/*.deb /var/lib/apt/lists/*_Packages")
    (tree / "usr/sbin/policy-rc.d").unlink()
    CACHE.mkdir(parents=True, exist_ok=True)
    run("tar", "-cf", str(cached.with_suffix(".tmp")), "-C", str(tree), "--numeric-owner", ".")
    cached.with_suffix(".tmp").rename(cached)


def wheels(folder: Path) -> None:
    """The adpop package and its dependencies as wheels built here (same CPython and glibc
    as the image's)."""
    log("wheels")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w",
        str(folder), str(REPO))
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' leftovers in the checkout


def install_adpop(tree: Path, wheel_dir: Path, dragonfly: Path | None,
                  cmdline_extra: str) -> None:
    lib = tree / "usr/lib/adpop"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "engine/build/adpop-engine", lib / "adpop-engine")
    shutil.copy2(REPO / "appliance/xdp/build/filter.bpf.o", lib / "filter.bpf.o")
    staged = tree / "tmp/wheels"
    shutil.copytree(wheel_dir, staged)
    chroot_script(tree, "python3 -m venv /usr/lib/adpop/venv && "
                  "/usr/lib/adpop/venv/bin/pip install -q --no-index --find-links /tmp/wheels "
                  "adpop && ln -sf /usr/lib/adpop/venv/bin/adpop /usr/bin/adpop")
    shutil.rmtree(staged)
    if dragonfly is not None:
        shutil.copy2(dragonfly, tree / "tmp/dragonfly.deb")
        chroot_script(tree, "dpkg -i /tmp/dragonfly.deb && rm /tmp/dragonfly.deb")
    # Units, generator and the files systemd reads at boot.
    system = tree / "usr/lib/systemd/system"
    for unit in (REPO / "units").iterdir():
        if unit.suffix in (".service", ".target"):
            shutil.copy2(unit, system / unit.name)
    generators = tree / "usr/lib/systemd/system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "units/generators/adpop-generator", generators / "adpop-generator")
    for kind in ("sysusers.d", "tmpfiles.d", "sysctl.d", "modprobe.d"):
        (tree / "usr/lib" / kind).mkdir(parents=True, exist_ok=True)
        for conf in (REPO / "units" / kind).iterdir():
            shutil.copy2(conf, tree / "usr/lib" / kind / conf.name)
    docs = tree / "usr/share/doc/adpop/units"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "units/README.md", docs / "README.md")
    # Configuration.
    etc = tree / "etc/adpop"
    (etc / "appliance.d").mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "config/appliance.toml", etc / "appliance.toml")
    (etc / "appliance.d/00-image.toml").write_text(IMAGE_CONFIG)
    # `adpop flash --config` puts the origin's TUF root.json here (snapshot.trust_root's
    # default).
    (tree / "var/lib/adpop/trust").mkdir(parents=True, exist_ok=True)
    (tree / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
    (tree / "etc/systemd/network/80-dhcp.network").write_text(NETWORK)
    (tree / "etc/hostname").write_text("adpop\n")
    (tree / "etc/machine-id").write_text("")  # made at first boot, one per machine
    # redis-server's own unit would take the cache's port: adpop-redis.service runs it.
    run("systemctl", f"--root={tree}", "mask", "redis-server.service")
    # An appliance is updated by flashing a new image, never by apt in place; its root is
    # plain ext4 (no LVM snapshots to scrub). These only cost boot time and a disk that
    # changes under the operator.
    run("systemctl", f"--root={tree}", "mask", *SELF_MAINTENANCE)
    run("systemctl", f"--root={tree}", "enable", "adpop.target", "adpop-tune.service",
        "adpop-secrets.service",
        "adpop-banner.service",
        "adpop-xdp.service", "adpop-supervisor.service", "adpop-engine.service",
        "adpop-redis.service", "dragonfly.service", "systemd-networkd.service")
    run("systemctl", f"--root={tree}", "set-default", "multi-user.target")
    (tree / "etc/kernel").mkdir(exist_ok=True)
    (tree / "etc/kernel/cmdline-adpop").write_text(cmdline_extra + "\n")


def tune_cmdline() -> str:
    """`adpop tune cmdline` for the image's default configuration."""
    config = REPO / "config" / "appliance.toml"
    return run(sys.executable, "-m", "appliance.cli", "tune", "cmdline", "--config",
               str(config), cwd=REPO).strip()


# --- the disk -------------------------------------------------------------------------------


def mib(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def root_filesystem(tree: Path, image: Path, fs_uuid: str) -> None:
    used = int(run("du", "-s", "--block-size=1", str(tree)).split()[0])
    size = mib(int(used * 1.3) + 256 * ALIGN)
    run("mkfs.ext4", "-q", "-F", "-L", "adpop-root", "-U", fs_uuid, "-d", str(tree),
        str(image), f"{size // 1024}k")


def esp(tree: Path, image: Path, options: str) -> None:
    kernel = sorted((tree / "boot").glob("vmlinuz-*"))[-1]
    initrd = tree / "boot" / kernel.name.replace("vmlinuz", "initrd.img")
    boot_efi = tree / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    image.unlink(missing_ok=True)
    run("mkfs.vfat", "-C", "-F", "32", "-n", "ADPOP-ESP", str(image), str(ESP_MIB * 1024))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for folder in ("EFI", "EFI/BOOT", "loader", "loader/entries", "adpop"):
        run("mmd", "-i", str(image), f"::/{folder}", env=env)
    staging = image.parent / "esp-files"
    staging.mkdir(exist_ok=True)
    (staging / "loader.conf").write_text("default adpop.conf\ntimeout 0\nconsole-mode keep\n")
    (staging / "adpop.conf").write_text(
        f"title adpop\nlinux /adpop/vmlinuz\ninitrd /adpop/initrd.img\noptions {options}\n")
    for source, target in ((boot_efi, "EFI/BOOT/BOOTX64.EFI"), (kernel, "adpop/vmlinuz"),
                           (initrd, "adpop/initrd.img"), (staging / "loader.conf",
                                                          "loader/loader.conf"),
                           (staging / "adpop.conf", "loader/entries/adpop.conf")):
        run("mcopy", "-i", str(image), str(source), f"::/{target}", env=env)
    shutil.rmtree(staging)


def disk(esp_image: Path, root_image: Path, out: Path) -> None:
    start = ALIGN
    esp_size, root_size = esp_image.stat().st_size, root_image.stat().st_size
    total = start + esp_size + root_size + ALIGN  # the backup GPT at the end
    out.unlink(missing_ok=True)
    with open(out, "wb") as fh:
        fh.truncate(total)
    table = (f"label: gpt\n"
             f"start={start // 512}, size={esp_size // 512}, type=uefi, name=esp\n"
             f"start={(start + esp_size) // 512}, size={root_size // 512}, type=linux, "
             f"name=root\n")
    run("sfdisk", "-q", str(out), input=table)
    for image, offset in ((esp_image, start), (root_image, start + esp_size)):
        run("dd", f"if={image}", f"of={out}", "bs=1M", f"seek={offset // ALIGN}",
            "conv=notrunc,sparse", "status=none")


# --- the build ------------------------------------------------------------------------------


def build(dragonfly: Path | None = None, force: bool = False) -> dict[str, Any]:
    if dragonfly is not None:
        expected = os.environ.get("DRAGONFLY_SHA256", "")
        actual = sha256_file(dragonfly)
        if not expected or actual != expected:
            raise BuildError(f"DRAGONFLY_DEB {dragonfly} has SHA-256 {actual}; set "
                             "DRAGONFLY_SHA256 to the value published with the package")
    version = project_version()
    raw = OUT / f"adpop-{version}.raw"
    manifest_path = OUT / f"adpop-{version}.manifest.json"
    wanted = inputs(dragonfly)
    tree = OUT / "work" / "tree"
    if not force and raw.exists() and manifest_path.exists() and tree.is_dir():
        previous = json.loads(manifest_path.read_text())
        if previous.get("inputs") == wanted:
            log(f"inputs unchanged: reusing {raw.name}")
            return {**previous, "reused": True}
    started = time.monotonic()
    work = OUT / "work"  # the tree stays here after the build, for the fast test tier
    if work.exists():
        shutil.rmtree(work)
    tree.mkdir(parents=True)
    base_tree(tree)
    wheels(work / "wheels")
    cmdline = tune_cmdline()
    install_adpop(tree, work / "wheels", dragonfly, cmdline)
    fs_uuid = str(uuid.uuid4())
    # The root is found by UUID and mounted read-write by the kernel command line; an fstab
    # line for it would only fail to remount where the tree runs without that disk (nspawn).
    (tree / "etc/fstab").write_text("# the root file system: see the kernel command line\n")
    options = (f"root=UUID={fs_uuid} rw console=ttyS0,115200 systemd.firstboot=off "
               f"{cmdline}")
    log("disk")
    root_filesystem(tree, work / "root.img", fs_uuid)
    esp(tree, work / "esp.img", options)
    disk(work / "esp.img", work / "root.img", raw)
    log("zstd")
    compressed = raw.with_suffix(".raw.zst")
    run("zstd", "-q", "-f", "-T0", "-6", str(raw), "-o", str(compressed))
    manifest: dict[str, Any] = {"version": version, "image": raw.name, "sha256": sha256_file(raw),
                "bytes": raw.stat().st_size,
                "allocated_bytes": raw.stat().st_blocks * 512,
                "zstd": compressed.name, "zstd_bytes": compressed.stat().st_size,
                "kernel_cmdline": options, "root_uuid": fs_uuid,
                "built_in_s": round(time.monotonic() - started, 1), "inputs": wanted}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work / "wheels")
    (work / "esp.img").unlink()
    (work / "root.img").unlink()
    log(f"{raw} ({manifest['allocated_bytes'] / 2**20:.0f} MiB allocated, "
        f"{manifest['zstd_bytes'] / 2**20:.0f} MiB zstd) in {manifest['built_in_s']} s")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if nothing changed")
    args = parser.parse_args()
    deb = os.environ.get("DRAGONFLY_DEB")
    try:
        build(Path(deb) if deb else None, args.force)
    except BuildError as exc:
        print(f"image: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
