"""Crafted packets for the XDP filter's table tests and its benchmark: Ethernet with VLAN
and QinQ tags, ARP, IPv4 (options, fragments), IPv6 (extension headers, fragments), TCP, UDP,
ICMP and neighbour discovery, each field written by hand so a header can be cut short."""

from __future__ import annotations

import ipaddress
import struct

MAC_DST, MAC_SRC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
ETH_IP, ETH_IP6, ETH_ARP, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8
TCP, UDP, ICMP, ICMP6, GRE = 6, 17, 1, 58, 47
HOP, ROUTING, FRAGMENT, DSTOPTS, AH = 0, 43, 44, 60, 51


def eth(ethertype: int, payload: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    """`vlans`: tag protocol ids, outermost first (0x88A8 then 0x8100 for QinQ)."""
    out = MAC_DST + MAC_SRC
    for vid, tpid in enumerate(vlans, 10):
        out += struct.pack("!H", tpid) + struct.pack("!H", vid)
    return out + struct.pack("!H", ethertype) + payload


def tcp(dport: int, sport: int = 40000, doff: int = 5) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, 0x02, 65535, 0, 0) + \
        b"\0" * max(0, (doff - 5) * 4)


def udp(dport: int, sport: int = 40000, payload: bytes = b"x" * 8) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(kind: int = 8) -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, 1, 1) + b"ping"


def ipv4(src: str, proto: int, payload: bytes, dst: str = "198.18.0.1", ihl: int = 5,
         frag: int = 0, version: int = 4, total: int | None = None) -> bytes:
    options = b"\x01" * ((ihl - 5) * 4) if ihl > 5 else b""
    length = total if total is not None else 20 + len(options) + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, length, 1, frag, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + options + payload


def ipv6(src: str, nexthdr: int, payload: bytes, dst: str = "2001:db8::1",
         version: int = 6) -> bytes:
    return struct.pack("!IHBB16s16s", version << 28, len(payload), nexthdr, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + \
        payload


def ext(nexthdr: int, payload: bytes, units: int = 0) -> bytes:
    """Hop-by-hop, routing or destination options: 8 bytes per unit beyond the first."""
    return struct.pack("!BB", nexthdr, units) + b"\0" * (6 + 8 * units) + payload


def auth(nexthdr: int, payload: bytes) -> bytes:
    """An AH header of 12 bytes + 4 of ICV (hdrlen counts 4-byte units minus 2)."""
    return struct.pack("!BBH", nexthdr, 2, 0) + b"\0" * 12 + payload


def frag6(nexthdr: int, payload: bytes, offset: int = 0, more: bool = True) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, offset << 3 | int(more), 7) + payload


def icmp6(kind: int) -> bytes:
    return struct.pack("!BBH", kind, 0, 0) + b"\0" * 20


def arp(sender: str = "198.18.5.7") -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, MAC_SRC,
                       ipaddress.IPv4Address(sender).packed, b"\0" * 6,
                       ipaddress.IPv4Address("198.18.0.1").packed)
