"""A batch's records as Arrow columns, by the engine tree's C++ decoder
(engine/src/event_columns.cpp, built by `make setup` as engine/build/libadpop_events.so)
through ctypes: no Python object per value, so that storing a batch costs about what
DuckDB's own bulk insert does. Without the library the origin decodes in Python
(appliance/origin/events.py, `reference_table`), which the tests hold this one to.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LIBRARY = "libadpop_events.so"
ERRORS = {1: "bad-framing", 2: "bad-crc", 3: "bad-record", 4: "bad-range"}

# Row types as the decoder numbers them.
TYPES = {1: "decision", 2: "impression", 3: "click", 4: "served"}


class _Columns(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_uint64),
        ("type", ctypes.c_void_p), ("time_ms", ctypes.c_void_p), ("offset", ctypes.c_void_p),
        ("idx", ctypes.c_void_p), ("slot", ctypes.c_void_p), ("version", ctypes.c_void_p),
        ("request_hash", ctypes.c_void_p), ("ads", ctypes.c_void_p),
        ("key_hi", ctypes.c_void_p), ("key_lo", ctypes.c_void_p),
        ("str_offsets", ctypes.c_void_p * 4), ("str_data", ctypes.c_void_p * 4),
        ("str_bytes", ctypes.c_uint64 * 4),
        ("min_time", ctypes.c_int64), ("max_time", ctypes.c_int64),
        ("error", ctypes.c_int32), ("error_at", ctypes.c_uint64),
        ("owner", ctypes.c_void_p),
    ]


@cache
def library() -> Any:
    """The loaded decoder, or None where it was not built (the Python one is used)."""
    candidates = [os.environ.get("ADPOP_EVENTS_LIBRARY", ""),
                  str(REPO / "engine" / "build" / LIBRARY), f"/usr/lib/adpop/{LIBRARY}"]
    for path in filter(None, candidates):
        if Path(path).is_file():
            lib = ctypes.CDLL(path)
            lib.adpop_decode.restype = ctypes.c_int32
            lib.adpop_decode.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64,
                                         ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p,
                                         ctypes.c_uint32, ctypes.POINTER(_Columns)]
            lib.adpop_free.argtypes = [ctypes.POINTER(_Columns)]
            return lib
    return None


# Column name -> Arrow type name, in the staged table's order (events.py's INSERT reads it).
FIXED = (("type", "uint8", 1), ("time", "int64", 8), ("offset", "uint64", 8),
         ("idx", "uint32", 4), ("slot", "uint32", 4), ("version", "uint32", 4),
         ("request_hash", "uint64", 8), ("ads", "uint16", 2), ("key_hi", "uint64", 8),
         ("key_lo", "uint64", 8))
STRINGS = ("campaign", "ad", "placement", "request_id")


def decode(data: bytes, base: int, pop: str, segment: str) -> tuple[Any, int, int] | str:
    """(staged Arrow table, earliest and latest event time in ms) of the framed records in
    `data`, which start at segment offset `base`; or the refusal's reason and where."""
    import pyarrow as pa  # type: ignore[import-untyped]  # no stubs published

    lib = library()
    out = _Columns()
    pop_b, seg_b = pop.encode(), segment.encode()
    try:
        error = lib.adpop_decode(data, len(data), base, pop_b, len(pop_b), seg_b, len(seg_b),
                                 ctypes.byref(out))
        if error:
            return f"{ERRORS.get(error, 'bad-record')} at {segment}:{out.error_at}"
        rows = int(out.rows)
        arrays = {}
        pointers = [out.type, out.time_ms, out.offset, out.idx, out.slot, out.version,
                    out.request_hash, out.ads, out.key_hi, out.key_lo]
        for (name, kind, width), pointer in zip(FIXED, pointers, strict=True):
            # One copy of each column out of the decoder's memory, none per value.
            buffer = pa.py_buffer(ctypes.string_at(pointer, rows * width))
            arrays[name] = pa.Array.from_buffers(getattr(pa, kind)(), rows, [None, buffer])
        for i, name in enumerate(STRINGS):
            offsets = pa.py_buffer(ctypes.string_at(out.str_offsets[i], (rows + 1) * 4))
            chars = pa.py_buffer(ctypes.string_at(out.str_data[i], out.str_bytes[i]))
            arrays[name] = pa.Array.from_buffers(pa.string(), rows, [None, offsets, chars])
        return pa.table(arrays), int(out.min_time), int(out.max_time)
    finally:
        lib.adpop_free(ctypes.byref(out))
