"""The versioned store: atomic `current`, high-water mark, pruning, and real kills."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.snapshot.store import SnapshotStore, StaleVersionError, StoreError

# The child stores snapshots whose manifest names the payload's hash, so a reader can tell a
# complete snapshot from a torn one without the signing machinery.
CHILD = r"""
import hashlib, json, os, shutil, signal, sys
from pathlib import Path
from appliance.snapshot.store import SnapshotStore

root, kill_at, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
calls = 0

def crashing(fn):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapper

# Count filesystem steps; with kill_at=N die exactly at the Nth, so every boundary between
# steps gets a crash (kill_at=0 only counts them).
for name in ("fsync", "rename", "replace", "symlink", "unlink", "mkdir"):
    setattr(os, name, crashing(getattr(os, name)))
shutil.rmtree = crashing(shutil.rmtree)

store = SnapshotStore(root, keep=3)
first = store.high_water() + 1
print("ready", flush=True)
for version in range(first, first + count):
    payload = os.urandom(64 * 1024) * 4
    manifest = json.dumps({"version": version,
                           "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    store.install(version, manifest, payload)
print("done", calls, flush=True)
"""


pytestmark = pytest.mark.unit


def run_child(root: Path, kill_at: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(kill_at), str(count)],
                            stdout=subprocess.PIPE, text=True)


def assert_current_is_complete(root: Path) -> int:
    link = root / "current"
    assert link.is_symlink(), "current link missing"
    target = link.resolve()
    assert target.parent == (root / "snapshots").resolve()
    manifest = json.loads((target / "manifest.json").read_bytes())
    payload = (target / "payload.capnp").read_bytes()
    assert manifest["version"] == int(target.name)
    assert hashlib.sha256(payload).hexdigest() == manifest["sha256"], "torn payload"
    return int(manifest["version"])


def assert_recovers(root: Path) -> None:
    store = SnapshotStore(root, keep=3)
    current = assert_current_is_complete(root)
    assert store.current_version() == current
    assert store.high_water() >= current
    leftovers = [p.name for p in (root / "snapshots").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # And it goes on working: the next version installs and activates.
    nxt = store.high_water() + 1
    store.install(nxt, json.dumps({"version": nxt, "sha256": hashlib.sha256(b"x").hexdigest()})
                  .encode(), b"x")
    assert assert_current_is_complete(root) == nxt


def seed_store(root: Path) -> None:
    child = run_child(root, 0, 1)
    assert child.wait(timeout=60) == 0


def test_kill_at_every_step(tmp_path: Path) -> None:
    probe = run_child(tmp_path / "probe", 0, 3)
    out, _ = probe.communicate(timeout=60)
    steps = int(out.split()[-1])
    assert steps >= 30  # three installs, each a dozen filesystem steps
    for kill_at in range(1, steps + 1):
        root = tmp_path / f"k{kill_at}"
        seed_store(root)
        child = run_child(root, kill_at, 3)
        child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL, f"step {kill_at} was never reached"
        assert_recovers(root)


def test_kill_at_random_moments(tmp_path: Path, rng: random.Random) -> None:
    root = tmp_path / "store"
    seed_store(root)
    for _ in range(25):
        child = run_child(root, 0, 10_000)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert_current_is_complete(root)
        SnapshotStore(root, keep=3)  # recovery on open
    assert_recovers(root)


def test_install_activate_prune(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    assert store.current_version() is None
    for version in (1, 2, 3, 4, 5):
        store.install(version, b"{}", b"payload %d" % version)
    assert store.versions() == [3, 4, 5]
    assert store.current_version() == 5
    assert store.high_water() == 5
    store.activate(3)  # roll back to a retained version
    assert store.current_version() == 3
    store.install(6, b"{}", b"six")
    # Pruning never removes the active version... but the rollback target was re-activated
    # before 6 arrived, so 3 is gone now and 6 is active.
    assert store.current_version() == 6
    assert 6 in store.versions() and len(store.versions()) == 3
    assert store.read(6) == (b"{}", b"six")


def test_prune_keeps_the_active_version(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    store.install(1, b"{}", b"1")
    store.add(2, b"{}", b"2")
    store.add(3, b"{}", b"3")
    store.prune()
    assert store.current_version() == 1
    assert 1 in store.versions()


def test_high_water_refuses_replays(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    store.install(5, b"{}", b"5")
    with pytest.raises(StaleVersionError, match="not above the high-water mark 5"):
        store.add(5, b"{}", b"again")
    with pytest.raises(StaleVersionError):
        store.add(4, b"{}", b"older")
    # The mark survives a restart.
    assert SnapshotStore(tmp_path, keep=3).high_water() == 5


def test_activate_unknown_version(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    with pytest.raises(StoreError, match="version 9 is not stored"):
        store.activate(9)


def test_keep_must_allow_rollback(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SnapshotStore(tmp_path, keep=1)


def test_unwritable_state_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create"):
        SnapshotStore(blocker / "state")


def test_corrupt_high_water_is_named(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    store.install(1, b"{}", b"1")
    (tmp_path / "high-water").write_text("garbage")
    with pytest.raises(StoreError, match="high-water is corrupt"):
        store.high_water()
    os.unlink(tmp_path / "high-water")
    assert SnapshotStore(tmp_path, keep=3).high_water() == 1
