"""The filter's map names, layouts and counter indices, read from filter.h: the header is the
one description both the BPF program and this controller follow."""

from __future__ import annotations

import re
import struct
from pathlib import Path

HEADER = Path(__file__).with_name("filter.h")

_DEFINE = re.compile(r"^#define (ADPOP_\w+) (.+)$", re.MULTILINE)
_ENUM = re.compile(r"^\s*(ADPOP_C_\w+) = (\d+),$", re.MULTILINE)


def _parse() -> tuple[dict[str, str | int], dict[str, int]]:
    text = HEADER.read_text()
    defines: dict[str, str | int] = {}
    for name, raw in _DEFINE.findall(text):
        value = raw.strip()
        defines[name] = value[1:-1] if value.startswith('"') else int(value, 0)
    counters = {name: int(index) for name, index in _ENUM.findall(text)}
    return defines, counters


DEFINES, _COUNTERS = _parse()


def _str(name: str) -> str:
    return str(DEFINES[name])


def _int(name: str) -> int:
    return int(DEFINES[name])


MAP_BLOCK4, MAP_BLOCK6 = _str("ADPOP_MAP_BLOCK4"), _str("ADPOP_MAP_BLOCK6")
MAP_RATE, MAP_PORTS = _str("ADPOP_MAP_RATE"), _str("ADPOP_MAP_PORTS")
MAP_CONFIG, MAP_COUNTERS = _str("ADPOP_MAP_CONFIG"), _str("ADPOP_MAP_COUNTERS")
MAP_TOP, PROGRAM = _str("ADPOP_MAP_TOP"), _str("ADPOP_PROGRAM")
MAPS = (MAP_BLOCK4, MAP_BLOCK6, MAP_RATE, MAP_PORTS, MAP_CONFIG, MAP_COUNTERS, MAP_TOP)
BLOCK_MAX = _int("ADPOP_BLOCK_MAX")
PORT_TCP, PORT_UDP = _int("ADPOP_PORT_TCP"), _int("ADPOP_PORT_UDP")
F_DROP_FRAGMENTS, F_ENFORCE_PORTS = _int("ADPOP_F_DROP_FRAGMENTS"), _int("ADPOP_F_ENFORCE_PORTS")

# Counter reason names, by index: "pass", "blocked", "rate", "port", "malformed", "fragment".
REASONS = [name.removeprefix("ADPOP_C_").lower()
           for name, _ in sorted(_COUNTERS.items(), key=lambda item: item[1])
           if name != "ADPOP_C_COUNT"]
COUNTER_COUNT = _COUNTERS["ADPOP_C_COUNT"]


def _layout(name: str) -> struct.Struct:
    layout = struct.Struct(_str(f"ADPOP_{name}_FMT"))
    if layout.size != _int(f"ADPOP_{name}_SIZE"):
        raise ValueError(f"filter.h: ADPOP_{name}_FMT does not match ADPOP_{name}_SIZE")
    return layout


LPM4, LPM6 = _layout("LPM4"), _layout("LPM6")
SOURCE, BUCKET = _layout("SOURCE"), _layout("BUCKET")
CONFIG, COUNTER = _layout("CONFIG"), _layout("COUNTER")
