"""The few libbpf calls the controller makes, through ctypes on Debian's libbpf.so.1 (libbpf
1.x: functions return a negative errno, or NULL with errno set)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.errors import AdpopError

XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
CLONE_NEWNET = 0x40000000
# Where systemd (and bpftool, when nothing has) mounts the BPF file system.
BPFFS = Path("/sys/fs/bpf")
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


class BpfError(AdpopError):
    """A BPF call failed."""

    def __init__(self, what: str, code: int, hint: str | None = None) -> None:
        super().__init__(f"{what}: {os.strerror(code)}", hint=hint)
        self.errno = code


class TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


def _load() -> Any:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise AdpopError(f"cannot load {name}: {exc}", hint="apt install libbpf1") from exc
    vp, ci, cu = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "bpf_object__open_file": (vp, [ctypes.c_char_p, vp]),
        "bpf_object__load": (ci, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__find_map_by_name": (vp, [vp, ctypes.c_char_p]),
        "bpf_object__find_program_by_name": (vp, [vp, ctypes.c_char_p]),
        "bpf_map__set_pin_path": (ci, [vp, ctypes.c_char_p]),
        "bpf_program__fd": (ci, [vp]),
        "bpf_obj_get": (ci, [ctypes.c_char_p]),
        "bpf_xdp_attach": (ci, [ci, ci, cu, vp]),
        "bpf_xdp_detach": (ci, [ci, cu, vp]),
        "bpf_xdp_query_id": (ci, [ci, ci, ctypes.POINTER(cu)]),
        "bpf_map_update_elem": (ci, [ci, vp, vp, ctypes.c_uint64]),
        "bpf_map_update_batch": (ci, [ci, vp, vp, ctypes.POINTER(cu), vp]),
        "bpf_map_lookup_elem": (ci, [ci, vp, vp]),
        "bpf_map_delete_elem": (ci, [ci, vp]),
        "bpf_map_get_next_key": (ci, [ci, vp, vp]),
        "bpf_prog_test_run_opts": (ci, [ci, ctypes.POINTER(TestRunOpts)]),
        "libbpf_num_possible_cpus": (ci, []),
    }
    for function, (restype, argtypes) in signatures.items():
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    return lib


LIB = _load()


def check(result: int, what: str) -> int:
    if result < 0:
        raise BpfError(what, -result)
    return result


def possible_cpus() -> int:
    return int(check(LIB.libbpf_num_possible_cpus(), "possible CPUs"))


def obj_get(path: str) -> int:
    fd = LIB.bpf_obj_get(path.encode())
    if fd < 0:
        raise BpfError(f"open {path}", ctypes.get_errno() or -fd,
                       hint="attach the filter first: `adpop xdp attach`")
    return int(fd)


@contextlib.contextmanager
def pinned_object(path: str) -> Iterator[int]:
    """A pinned map's descriptor for the duration of a `with`: every read opens one, and a
    long-lived process (the supervisor's control API) must not keep them."""
    fd = obj_get(path)
    try:
        yield fd
    finally:
        os.close(fd)


def mount_point(path: Path) -> tuple[Path, str]:
    """The mount point holding `path` and its file-system type, from /proc/self/mountinfo."""
    best, fstype = Path("/"), ""
    resolved = path.resolve()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        # Fields: id parent major:minor root mount-point options [optional...] - type ...
        point = Path(fields[4].replace("\\040", " "))
        kind = fields[fields.index("-") + 1]
        if (resolved == point or point in resolved.parents) and \
                len(point.parts) >= len(best.parts):
            best, fstype = point, kind  # later lines are mounted over earlier ones
    return best, fstype


def ensure_bpffs(pin_dir: Path) -> str:
    """Makes sure `pin_dir` lies on a BPF file system, mounting one at /sys/fs/bpf when
    nothing has (a host without systemd as PID 1 mounts none), as bpftool does. Returns
    what it did ("" when bpffs was already there); raises BpfError when it cannot."""
    if mount_point(pin_dir)[1] == "bpf":
        return ""
    if pin_dir.resolve() != BPFFS and BPFFS not in pin_dir.resolve().parents:
        raise BpfError(f"{pin_dir} is not on a BPF file system", errno.EINVAL,
                       hint=f"set xdp.pin_dir to a folder under {BPFFS}")
    BPFFS.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    # mode=700 as systemd mounts it: pinned maps are root's.
    if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  b"mode=700") != 0:
        raise BpfError(f"mount bpffs at {BPFFS}", ctypes.get_errno(),
                       hint=f"mount it yourself: mount -t bpf bpf {BPFFS}")
    return f"mounted the BPF file system at {BPFFS} (nothing had mounted it)"


def update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    check(LIB.bpf_map_update_elem(fd, key, value, flags), "map update")


def update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """`count` entries in one system call: keys and values packed back to back."""
    done = ctypes.c_uint32(count)
    check(LIB.bpf_map_update_batch(fd, keys, values, ctypes.byref(done), None),
          "map batch update")
    if done.value != count:
        raise BpfError(f"map batch update wrote {done.value} of {count} entries", errno.EIO)


def lookup(fd: int, key: bytes, size: int) -> bytes | None:
    out = ctypes.create_string_buffer(size)
    result = LIB.bpf_map_lookup_elem(fd, key, out)
    if result < 0:
        if -result == errno.ENOENT:
            return None
        check(result, "map lookup")
    return out.raw


def delete(fd: int, key: bytes) -> bool:
    result = LIB.bpf_map_delete_elem(fd, key)
    if result < 0 and -result == errno.ENOENT:
        return False
    check(result, "map delete")
    return True


def keys(fd: int, size: int) -> list[bytes]:
    found: list[bytes] = []
    current: bytes | None = None
    following = ctypes.create_string_buffer(size)
    while LIB.bpf_map_get_next_key(fd, current, following) == 0:
        current = following.raw
        found.append(current)
    return found


def test_run(prog_fd: int, packet: bytes, repeat: int = 1) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: the program's return code and its mean ns per run."""
    out = ctypes.create_string_buffer(len(packet) + 256)
    data = ctypes.create_string_buffer(packet, len(packet))
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.cast(data, ctypes.c_void_p),
                       data_out=ctypes.cast(out, ctypes.c_void_p), data_size_in=len(packet),
                       data_size_out=len(out), repeat=repeat)
    check(LIB.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run")
    return int(opts.retval), int(opts.duration)


def enter_netns(name: str) -> None:
    """Moves this process into the network namespace `ip netns` calls `name` (the mount
    namespace stays, so /sys/fs/bpf is still the host's)."""
    path = f"/run/netns/{name}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise AdpopError(f"network namespace {name!r} does not exist ({exc.strerror})",
                         hint="`ip netns list` names them") from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise BpfError(f"setns {path}", ctypes.get_errno())
    finally:
        os.close(fd)
