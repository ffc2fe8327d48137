"""Making a file system change durable: what acknowledged-means-stored rests on."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Makes the entries of `folder` durable (a rename or an unlink in it survives a crash
    of the machine, not only of the process)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
