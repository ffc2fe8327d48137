"""What the shipper has had acknowledged, per segment (issue 23, step 1).

One small JSON file in the spool folder, `shipped.json`: segment name -> the offset up to
which the origin has acknowledged its records as stored. It is a hint where to resume, not
what exactly-once rests on (the origin's deduplication is): at worst the shipper sends again
records the origin already holds, and the origin acknowledges them without storing them
twice. So it is replaced whole (temporary file, rename: never half a file after a crash of
the process) but not fsynced: after a power loss it may be older, or unreadable, which only
means sending more again; an unreadable one is logged and started over. Syncing it after
every acknowledgement cost the shipper a fifth of its CPU.

A segment is deleted only once it is closed and acknowledged up to the end of its intact
records; then its entry goes. An entry whose segment is gone (a crash between the two) is
dropped at the next load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from appliance.events.batch import segment_name

LEDGER = "shipped.json"
log = logging.getLogger("adpop.shipper")


class Ledger:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LEDGER
        self.offsets: dict[str, int] = {}
        self.unwritten = False  # the last write failed (said once, until one succeeds)
        try:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read the shipper's ledger %s (%s): starting over; the origin "
                        "stores what is sent again once", self.path, exc)
            raw = {}
        if not isinstance(raw, dict):
            log.warning("the shipper's ledger %s is not a JSON object: starting over",
                        self.path)
            raw = {}
        present = {segment_name(p.name) for p in folder.glob("*.closed")} | \
            {segment_name(p.name) for p in folder.glob("*.spool")}
        self.offsets = {str(k): int(v) for k, v in raw.items()
                        if str(k) in present and isinstance(v, int) and v >= 0}

    def acked(self, segment: str) -> int:
        return self.offsets.get(segment, 0)

    def ack(self, segment: str, end: int) -> None:
        """Records up to `end` are stored at the origin (never moves back)."""
        if end > self.acked(segment):
            self.offsets[segment] = end
            self._write()

    def retire(self, path: Path, intact_end: int) -> bool:
        """Deletes closed segment `path` when its intact records (up to `intact_end`) are
        all acknowledged; whether it did."""
        name = segment_name(path.name)
        if not path.name.endswith(".closed") or self.acked(name) < intact_end:
            return False
        path.unlink(missing_ok=True)
        if self.offsets.pop(name, None) is not None:
            self._write()
        return True

    def _write(self) -> None:
        """Best effort: a full spool folder must not stop the shipping that empties it. The
        offsets stay in memory, and the next write that fits records them."""
        tmp = self.path.with_name(f".{LEDGER}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.offsets, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if not self.unwritten:
                log.warning("cannot write the shipper's ledger %s (%s); going on: after a "
                            "restart more is sent again, and the origin stores it once",
                            self.path, exc.strerror)
            self.unwritten = True
        else:
            self.unwritten = False
