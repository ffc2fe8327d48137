"""What the shipper has had acknowledged, per segment (issue 23, step 1).

One small JSON file in the spool folder, `shipped.json`: segment name -> the offset up to
which the origin has acknowledged its records as stored. It is written whole (temporary
file, fsync, rename, fsync of the folder) after each acknowledgement, so after a crash the
shipper resumes at the offset it last wrote: at worst it sends again a batch the origin
already stored, under the same id, and the origin acknowledges it without storing it twice.

A segment is deleted only once it is closed and acknowledged up to the end of its intact
records; then its entry goes. An entry whose segment is gone (a crash between the two) is
dropped at the next load.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance.durable import fsync_dir, write_file
from appliance.errors import AdpopError
from appliance.events.batch import segment_name

LEDGER = "shipped.json"


class LedgerError(AdpopError):
    """The ledger cannot be read or written."""


class Ledger:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LEDGER
        self.offsets: dict[str, int] = {}
        try:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError) as exc:
            raise LedgerError(f"cannot read the shipper's ledger {self.path}: {exc}",
                              hint="move it aside: the shipper then sends every segment "
                                   "again, and the origin stores each batch once") from exc
        if not isinstance(raw, dict):
            raise LedgerError(f"{self.path} is not a JSON object",
                              hint="move it aside; the origin stores each batch once")
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
        fsync_dir(self.folder)
        if self.offsets.pop(name, None) is not None:
            self._write()
        return True

    def _write(self) -> None:
        try:
            write_file(self.path, json.dumps(self.offsets, sort_keys=True).encode())
        except OSError as exc:
            raise LedgerError(f"cannot write the shipper's ledger {self.path}: {exc.strerror}",
                              hint="free space in the spool folder") from exc
