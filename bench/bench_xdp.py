"""XDP filter: ns per packet for the pass path and each drop path through BPF_PROG_TEST_RUN
with repeat, with 100k CIDRs in the blocklist (goal: pass path <= 60 ns), beside a program
that only returns XDP_PASS, measured in the same run; then packets per second through a veth
pair into a namespace this bench makes, with and without the filter attached.

The veth figure: a C sender (bench/c/udpflood.c, sendmmsg, bounded to 2 s and 20M packets)
on the host side sends 64-byte UDP datagrams to a port nothing listens on inside the
namespace; what reached the namespace's UDP layer is its NoPorts count. Addresses are from
198.18.0.0/15; the namespace is removed at the end.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from appliance import config as cfg
from appliance.xdp import Filter, Settings, libbpf, parse_cidr
from tests import xdp_packets as p

REPEAT = 2_000_000
GOAL_NS = 60
BLOCKLIST = 100_000
NS, OUTER, INNER = "adpop-benchxdp", "adpbx0", "eth1"
PASS_ONLY = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int pass_only(struct xdp_md *ctx) { return XDP_PASS; }
char LICENSE[] SEC("license") = "GPL";
"""


def compile_pass_only(folder: Path) -> int:
    source, obj = folder / "pass.bpf.c", folder / "pass.bpf.o"
    source.write_text(PASS_ONLY)
    machine = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True,
                             check=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-target", "bpf", f"-I/usr/include/{machine}", "-c",
                    str(source), "-o", str(obj)], check=True)
    handle = libbpf.LIB.bpf_object__open_file(str(obj).encode(), None)
    libbpf.check(libbpf.LIB.bpf_object__load(handle), "load pass_only")
    prog = libbpf.LIB.bpf_object__find_program_by_name(handle, b"pass_only")
    return int(libbpf.LIB.bpf_program__fd(prog))


def ns_per_packet(prog: int, packet: bytes) -> int:
    runs = [libbpf.test_run(prog, packet, REPEAT)[1] for _ in range(3)]
    return sorted(runs)[1]


def blocklist(count: int) -> list[ipaddress.IPv4Network]:
    rng = random.Random(7)
    nets: set[ipaddress.IPv4Network] = set()
    while len(nets) < count:  # /32s and /24s across 10.0.0.0/8 and 100.64.0.0/10
        base = rng.choice((0x0A000000, 0x64400000))
        span = 1 << 24 if base == 0x0A000000 else 1 << 22
        length = rng.choice((24, 32))
        address = (base + rng.randrange(span)) & (0xFFFFFFFF << (32 - length))
        nets.add(ipaddress.IPv4Network((address, length)))
    return list(nets)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def no_ports() -> int:
    lines = [line.split() for line in sh("ip", "netns", "exec", NS, "cat", "/proc/net/snmp")
             .splitlines() if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["NoPorts"])


def veth_pps(flood: Path) -> float:
    before = no_ports()
    out = sh(str(flood), "198.18.0.2", "198.18.0.1", "9999", "2", "20000000").split()
    return (no_ports() - before) / float(out[1])


def main() -> None:
    pin_dir = Path(f"/sys/fs/bpf/adpop-bench-{os.getpid()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = folder / "appliance.toml"
        config.write_text(f'[xdp]\npin_dir = "{pin_dir}"\nallow_udp_ports = ["9999"]\n'
                          f'rate_pps = 1000000000\nburst = 1000\n')
        appliance = cfg.load(cfg.Scope.APPLIANCE, config)
        ports = appliance.tuning.local_port_range
        flt = Filter(appliance.xdp, ports)
        obj, prog = flt._load()
        try:
            started = time.monotonic()
            flt.block(blocklist(BLOCKLIST))
            flt.block([parse_cidr("198.18.5.0/24")])
            loaded_in = time.monotonic() - started
            floor = ns_per_packet(compile_pass_only(folder), p.eth(p.ETH_IP, p.ipv4(
                "198.18.1.1", p.TCP, p.tcp(80))))
            cases = {
                "pass (IPv4 TCP 80)": p.eth(p.ETH_IP, p.ipv4("198.18.1.1", p.TCP, p.tcp(80))),
                "pass (IPv6 TCP 443)": p.eth(p.ETH_IP6, p.ipv6("2001:db8:1::1", p.TCP,
                                                                p.tcp(443))),
                "drop blocked": p.eth(p.ETH_IP, p.ipv4("198.18.5.7", p.TCP, p.tcp(80))),
                "drop port": p.eth(p.ETH_IP, p.ipv4("198.18.1.2", p.TCP, p.tcp(25))),
                "drop malformed": p.eth(p.ETH_IP, p.ipv4("198.18.1.3", p.TCP, p.tcp(80)[:8])),
            }
            results = {name: ns_per_packet(prog, packet) for name, packet in cases.items()}
            rate = Settings.from_config(replace(appliance.xdp, rate_pps=1), ports)
            flt.write_settings(rate)
            results["drop rate"] = ns_per_packet(prog, p.eth(p.ETH_IP, p.ipv4(
                "198.18.1.4", p.UDP, p.udp(9999))))
            frags = replace(appliance.xdp, drop_fragments=True)
            flt.write_settings(Settings.from_config(frags, ports))
            results["drop fragment"] = ns_per_packet(prog, p.eth(p.ETH_IP, p.ipv4(
                "198.18.1.5", p.TCP, p.tcp(80), frag=0x2000)))
        finally:
            libbpf.LIB.bpf_object__close(obj)
        print(f"xdp: {BLOCKLIST} blocklist CIDRs loaded in {loaded_in:.2f} s; "
              f"ns per packet (BPF_PROG_TEST_RUN, repeat {REPEAT}, median of 3), baseline "
              f"XDP_PASS-only program: {floor} ns")
        for name, value in results.items():
            goal = f" (goal <= {GOAL_NS} ns) [{'met' if value <= GOAL_NS else 'NOT met'}]" \
                if name.startswith("pass (IPv4") else ""
            print(f"  {name:22} {value:>5} ns{goal}")

        flood = folder / "udpflood"
        sh("gcc", "-O2", "-o", str(flood), str(Path(__file__).parent / "c" / "udpflood.c"))
        try:
            sh("ip", "netns", "add", NS)
            sh("ip", "link", "add", OUTER, "type", "veth", "peer", "name", INNER, "netns", NS)
            sh("ip", "addr", "add", "198.18.0.2/24", "dev", OUTER)
            sh("ip", "link", "set", OUTER, "up")
            sh("ip", "netns", "exec", NS, "ip", "addr", "add", "198.18.0.1/24", "dev", INNER)
            sh("ip", "netns", "exec", NS, "ip", "link", "set", INNER, "up")
            flt.write_settings(Settings.from_config(appliance.xdp, ports))
            without = veth_pps(flood)
            # Attached by the CLI in its own process: setns would move this one.
            attached = sh(sys.executable, "-m", "appliance.cli", "xdp", "attach", "--nic", INNER,
                          "--netns", NS, "--config", str(config)).strip()
            with_filter = veth_pps(flood)
            print(f"xdp: veth UDP packets/s into the namespace: without the filter "
                  f"{without:,.0f}, with it ({attached}) {with_filter:,.0f} "
                  f"({with_filter / without:.2f}x)")
        finally:
            subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", OUTER], capture_output=True, check=False)
            shutil.rmtree(pin_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
