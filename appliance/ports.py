"""Ports as the configuration writes them: "443" or a range "32768-60999"."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.errors import AdpopError


class PortError(AdpopError):
    """A port entry that is not a port, not a range, or out of bounds."""


def span(item: str, what: str) -> tuple[int, int]:
    """The first and last port of one "N" or "N-M" entry."""
    low, dash, high = str(item).strip().partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
        raise PortError(f"{what}: {item!r} is not a port or a range N-M",
                        hint='write ports like "443" or "32768-60999"')
    first, last = int(low), int(high) if dash else int(low)
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise PortError(f"{what}: port {port} is out of range 1-65535",
                            hint="use ports from 1 to 65535")
    if last < first:
        raise PortError(f"{what}: range {item!r} runs backwards", hint="write the lower first")
    return first, last


def parse_ports(items: Iterable[str], what: str) -> set[int]:
    """Every port of the entries; raises PortError naming the first bad one."""
    ports: set[int] = set()
    for item in items:
        first, last = span(item, what)
        ports.update(range(first, last + 1))
    return ports
