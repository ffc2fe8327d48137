"""The XDP filter's controller: attach, detach, blocklists, live settings, counters.

The program (filter.bpf.c, built by `make setup` into appliance/xdp/build/filter.bpf.o, in
the image /usr/lib/adpop/filter.bpf.o) keeps its maps pinned under xdp.pin_dir, so loading
it again reuses them: a re-attach keeps the counters, the blocklist and the buckets. Every
input is checked before anything is loaded or attached, so a bad CIDR, port or NIC changes
nothing.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ipaddress
import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import XdpSettings
from appliance.errors import AdpopError
from appliance.ports import parse_ports
from appliance.xdp import layout, libbpf

REPO_OBJECT = Path(__file__).with_name("build") / "filter.bpf.o"
STATE_DIR = Path("/run/adpop-xdp")
PORTS = 65536
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class XdpError(AdpopError):
    """Bad filter input, or the kernel refused the filter."""


def parse_cidr(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        loose = None
        with contextlib.suppress(ValueError):
            loose = ipaddress.ip_network(text.strip(), strict=False)
        hint = (f"did you mean {loose}?" if loose is not None
                else "write an address or a CIDR, e.g. 198.18.0.0/15 or 2001:db8::/32")
        raise XdpError(f"{text.strip()!r} is not a valid CIDR ({exc})", hint=hint) from exc


def lpm_key(net: Network) -> tuple[str, bytes]:
    if net.version == 4:
        return layout.MAP_BLOCK4, layout.LPM4.pack(net.prefixlen, net.network_address.packed)
    return layout.MAP_BLOCK6, layout.LPM6.pack(net.prefixlen, net.network_address.packed)


def read_blocklist(path: Path) -> list[Network]:
    """CIDRs one per line, `#` comments; the first bad line is an error naming it."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise XdpError(f"cannot read blocklist {path}: {exc.strerror}") from exc
    nets = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                nets.append(parse_cidr(text))
            except XdpError as exc:
                raise XdpError(f"{path}:{number}: {exc.message}", hint=exc.hint) from exc
    return nets


def source_text(key: bytes) -> str:
    address = ipaddress.IPv6Address(key[:16])
    return str(address.ipv4_mapped or address)


@dataclass(frozen=True)
class Settings:
    """The live part of the configuration, checked."""

    cost_ns: int
    burst_ns: int
    flags: int
    tcp: set[int]
    udp: set[int]

    @classmethod
    def from_config(cls, x: XdpSettings, local_ports: str) -> Settings:
        """`local_ports`: tuning.local_port_range. Replies to this host's own connections
        arrive on the ports adpop tune gives the kernel for them: one setting, so the two can
        never disagree."""
        reply = parse_ports([local_ports], "tuning.local_port_range")
        tcp = parse_ports(x.allow_tcp_ports, "xdp.allow_tcp_ports") | reply
        udp = parse_ports(x.allow_udp_ports, "xdp.allow_udp_ports") | reply
        cost = 1_000_000_000 // x.rate_pps if x.rate_pps else 0
        flags = (layout.F_DROP_FRAGMENTS if x.drop_fragments else 0) | \
            (layout.F_ENFORCE_PORTS if x.enforce_ports else 0)
        return cls(cost, cost * max(x.burst, 1), flags, tcp, udp)


class Filter:
    def __init__(self, xdp: XdpSettings, local_ports: str) -> None:
        self.x = xdp
        self.local_ports = local_ports
        self.pin_dir = Path(self.x.pin_dir)
        # bpffs holds only BPF objects: where the filter is attached is noted in /run.
        self.state_file = STATE_DIR / f"{self.pin_dir.name}.json"
        self.mounted = ""  # what loading did to make bpffs exist, for the caller to report

    # --- maps ---------------------------------------------------------------------------

    def opened(self, name: str) -> contextlib.AbstractContextManager[int]:
        """A pinned map's descriptor, closed when the `with` ends."""
        return libbpf.pinned_object(str(self.pin_dir / name))

    def pinned(self) -> bool:
        return all((self.pin_dir / name).exists() for name in layout.MAPS)

    def object_path(self) -> Path:
        for candidate in (Path(self.x.object), REPO_OBJECT):
            if candidate.is_file():
                return candidate
        raise XdpError(f"no XDP object at {self.x.object} or {REPO_OBJECT}",
                       hint="`make setup` builds appliance/xdp/build/filter.bpf.o")

    def write_settings(self, settings: Settings) -> None:
        """Rate, burst, flags and the port allowlist, live: the program reads them per packet."""
        with self.opened(layout.MAP_CONFIG) as fd:
            libbpf.update(fd, (0).to_bytes(4, "little"),
                          layout.CONFIG.pack(settings.cost_ns, settings.burst_ns, settings.flags))
        # The whole allowlist in one batch: 65536 single updates took seconds at boot under
        # emulation (and a live settings change left a half-written list meanwhile).
        bits = bytearray(PORTS)
        for port in settings.tcp:
            bits[port] |= layout.PORT_TCP
        for port in settings.udp:
            bits[port] |= layout.PORT_UDP
        keys = array.array("I", range(PORTS)).tobytes()  # u32 0..65535, host byte order
        with self.opened(layout.MAP_PORTS) as fd:
            libbpf.update_batch(fd, keys, bytes(bits), PORTS)

    # --- attach and detach --------------------------------------------------------------

    def _load(self) -> tuple[int, int]:
        """Loads the program with its maps pinned (reused when already pinned); returns the
        bpf_object pointer and the program's fd."""
        self.mounted = libbpf.ensure_bpffs(self.pin_dir)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        lib = libbpf.LIB
        obj = lib.bpf_object__open_file(str(self.object_path()).encode(), None)
        if not obj:
            raise libbpf.BpfError(f"open {self.object_path()}", ctypes.get_errno())
        for name in layout.MAPS:
            found = lib.bpf_object__find_map_by_name(obj, name.encode())
            libbpf.check(lib.bpf_map__set_pin_path(found, str(self.pin_dir / name).encode()),
                         f"pin path of {name}")
        try:
            libbpf.check(lib.bpf_object__load(obj), "load the XDP program")
        except libbpf.BpfError:
            lib.bpf_object__close(obj)
            raise
        prog = lib.bpf_object__find_program_by_name(obj, layout.PROGRAM.encode())
        return obj, libbpf.check(lib.bpf_program__fd(prog), "program fd")

    def attach(self, nics: list[str], netns: str = "") -> dict[str, str]:
        """Attaches to every NIC in native mode, else generic; all or none."""
        # Every check before anything changes.
        settings = Settings.from_config(self.x, self.local_ports)
        blocklist = read_blocklist(Path(self.x.blocklist)) if self.x.blocklist else []
        if netns:
            libbpf.enter_netns(netns)
        indexes = {nic: interface_index(nic, netns) for nic in nics}
        obj, prog_fd = self._load()
        attached: dict[str, str] = {}
        try:
            self.write_settings(settings)
            for nic, index in indexes.items():
                attached[nic] = self._attach_one(index, prog_fd, nic)
        except AdpopError:
            for nic in attached:
                self._detach_one(indexes[nic])
            raise
        finally:
            libbpf.LIB.bpf_object__close(obj)  # the attachment holds the program
        if blocklist:
            self.block(blocklist)
        self._remember({nic: {"mode": mode, "netns": netns} for nic, mode in attached.items()})
        return attached

    @staticmethod
    def _attach_one(index: int, prog_fd: int, nic: str) -> str:
        failures = []
        for mode, flag in (("native", libbpf.XDP_FLAGS_DRV_MODE),
                           ("generic", libbpf.XDP_FLAGS_SKB_MODE)):
            result = libbpf.LIB.bpf_xdp_attach(index, prog_fd, flag, None)
            if result == 0:
                return mode
            failures.append(f"{mode}: {libbpf.BpfError('', -result).message.lstrip(': ')}")
        raise XdpError(f"cannot attach to {nic} ({'; '.join(failures)})",
                       hint="is another XDP program attached? `ip link show` says")

    @staticmethod
    def _detach_one(index: int) -> None:
        for flag in (libbpf.XDP_FLAGS_DRV_MODE, libbpf.XDP_FLAGS_SKB_MODE):
            libbpf.LIB.bpf_xdp_detach(index, flag, None)

    def detach(self, nics: list[str], netns: str = "") -> list[str]:
        if netns:
            libbpf.enter_netns(netns)
        indexes = {nic: interface_index(nic, netns) for nic in nics}
        for index in indexes.values():
            self._detach_one(index)
        remembered = self._remembered()
        for nic in nics:
            remembered.pop(nic, None)
        self._write_state(remembered)
        return list(indexes)

    def attached_now(self, nics: list[str]) -> dict[str, str]:
        """NIC → "native", "generic" or "" from the kernel itself (this namespace)."""
        out = {}
        for nic in nics:
            index = interface_index(nic)
            mode = ""
            for name, flag in (("native", libbpf.XDP_FLAGS_DRV_MODE),
                               ("generic", libbpf.XDP_FLAGS_SKB_MODE)):
                prog_id = ctypes.c_uint32(0)
                if libbpf.LIB.bpf_xdp_query_id(index, flag, ctypes.byref(prog_id)) == 0 and \
                        prog_id.value:
                    mode = name
            out[nic] = mode
        return out

    def _remembered(self) -> dict[str, dict[str, str]]:
        if not self.state_file.exists():
            return {}
        loaded: dict[str, dict[str, str]] = json.loads(self.state_file.read_text())
        return loaded

    def _remember(self, attached: dict[str, dict[str, str]]) -> None:
        self._write_state({**self._remembered(), **attached})

    def _write_state(self, state: dict[str, dict[str, str]]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state))

    # --- blocklist ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _blocklists(self) -> Iterator[dict[str, int]]:
        with self.opened(layout.MAP_BLOCK4) as v4, self.opened(layout.MAP_BLOCK6) as v6:
            yield {layout.MAP_BLOCK4: v4, layout.MAP_BLOCK6: v6}

    def block(self, nets: Iterable[Network]) -> int:
        count = 0
        with self._blocklists() as fds:
            for net in nets:
                name, key = lpm_key(net)
                try:
                    libbpf.update(fds[name], key, b"\x01")
                except libbpf.BpfError as exc:
                    raise XdpError(f"blocklist full after {count} new entries ({exc.message})",
                                   hint=f"the filter holds {layout.BLOCK_MAX} per family") \
                        from exc
                count += 1
        return count

    def unblock(self, nets: Iterable[Network]) -> int:
        with self._blocklists() as fds:
            return sum(libbpf.delete(fds[name], key) for name, key in map(lpm_key, nets))

    def blocked(self) -> dict[str, int]:
        with self._blocklists() as fds:
            return {"ipv4": len(libbpf.keys(fds[layout.MAP_BLOCK4], layout.LPM4.size)),
                    "ipv6": len(libbpf.keys(fds[layout.MAP_BLOCK6], layout.LPM6.size))}

    # --- counters -----------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        cpus = libbpf.possible_cpus()
        size = layout.COUNTER.size
        out = {}
        with self.opened(layout.MAP_COUNTERS) as fd:
            raws = [libbpf.lookup(fd, index.to_bytes(4, "little"), size * cpus) or b""
                    for index in range(len(layout.REASONS))]
        for reason, raw in zip(layout.REASONS, raws, strict=True):
            packets = byte_count = 0
            for cpu in range(cpus):
                p, b = layout.COUNTER.unpack_from(raw, cpu * size)
                packets, byte_count = packets + p, byte_count + b
            out[reason] = {"packets": packets, "bytes": byte_count}
        return out

    def top(self, limit: int = 10) -> list[dict[str, Any]]:
        counts: list[tuple[int, str]] = []
        with self.opened(layout.MAP_TOP) as fd:
            for key in libbpf.keys(fd, layout.SOURCE.size):
                value = libbpf.lookup(fd, key, 8)
                if value is not None:
                    counts.append((int.from_bytes(value, "little"), source_text(key)))
        counts.sort(reverse=True)
        return [{"source": source, "drops": drops} for drops, source in counts[:limit]]

    def status(self, blocked: dict[str, int] | None = None) -> dict[str, Any]:
        """`blocked`: blocklist sizes the caller already counted (counting walks every key)."""
        if not self.pinned():
            return {"loaded": False, "pin_dir": str(self.pin_dir), "attached": {},
                    "reason": "not loaded; `adpop xdp attach` loads it"}
        return {"loaded": True, "pin_dir": str(self.pin_dir), "attached": self._remembered(),
                "blocklist": blocked if blocked is not None else self.blocked(),
                "counters": self.counters(), "top": self.top(),
                "rate_pps": self.x.rate_pps, "burst": self.x.burst}


def interface_index(nic: str, netns: str = "") -> int:
    try:
        return socket.if_nametoindex(nic)
    except OSError as exc:
        where = f" in network namespace {netns}" if netns else ""
        raise XdpError(f"NIC {nic!r} does not exist{where}",
                       hint="`ip link` lists the NICs; fix xdp.nics or --nic") from exc
