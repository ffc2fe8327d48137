"""The appliance image: size (raw, allocated, zstd), build times and UEFI boot-to-serving.

- cold build: no cached base tree (debootstrap and apt from the network) and no image;
- warm build: the same inputs again (the image is reused);
- rebuild: a changed input with the base tree cached (adpop's layers and the disk only);
- boot to serving: qemu (TCG) with OVMF from power-on until POST /v1/decide through the
  forwarded port returns an ad (goal < 30 s). Beside it, the same boot until the kernel
  hands over to systemd, read from the serial console, as the floor of this machine.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from images import boot, build

GOAL_S = 30.0


def timed(force: bool) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    manifest = build.build(force=force)
    return time.monotonic() - started, manifest


def main() -> None:
    aside = Path(tempfile.mkdtemp(prefix="adpop-bench-cache-"))
    moved = list(build.CACHE.glob("base-*.tar")) if build.CACHE.exists() else []
    for tar in moved:
        shutil.move(tar, aside / tar.name)
    try:
        cold, manifest = timed(force=True)
    finally:
        for tar in aside.glob("*.tar"):
            if not (build.CACHE / tar.name).exists():
                shutil.move(tar, build.CACHE / tar.name)
        shutil.rmtree(aside, ignore_errors=True)
    warm, _ = timed(force=False)
    rebuild, manifest = timed(force=True)
    with tempfile.TemporaryDirectory() as tmp:
        booted = boot.boot_and_serve(build.OUT / str(manifest["image"]), int(manifest["bytes"]),
                                     Path(tmp))
    stamps = [float(m) for m in re.findall(r"\[\s*(\d+\.\d+)\] systemd\[1\]", booted.serial)]
    kernel_to_systemd = f"{stamps[0]:.1f} s after the kernel started" if stamps else "n/a"
    mib = 2**20
    print(f"image: {manifest['image']}: {int(manifest['bytes']) / mib:,.0f} MiB raw, "
          f"{int(manifest['allocated_bytes']) / mib:,.0f} MiB allocated, "
          f"{int(manifest['zstd_bytes']) / mib:,.0f} MiB zstd")
    print(f"image build: cold {cold:.0f} s, warm (unchanged inputs) {warm:.1f} s, "
          f"rebuild on a cached base {rebuild:.0f} s")
    print(f"image boot (UEFI, TCG): serving after {booted.serving_after_s:.1f} s from power-on "
          f"(goal < {GOAL_S:.0f} s) [{'met' if booted.serving_after_s < GOAL_S else 'NOT met'}]"
          f"; systemd started {kernel_to_systemd}")


if __name__ == "__main__":
    main()
