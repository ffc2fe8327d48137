"""What the supervisor tells systemd and the operator: sd_notify messages and log lines.

Under systemd (JOURNAL_STREAM or INVOCATION_ID set) log records go to journald with the
structured fields COMPONENT, SNAPSHOT_VERSION and OPERATOR_UID; otherwise to stderr. Either
way the last lines are kept in memory for the control API's `logs`.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from systemd import daemon, journal

if TYPE_CHECKING:  # annotations only: the schema is for type checkers and tests
    from appliance.supervisor.schema import LogLine


RECENT_LINES = 2000


def notify(*lines: str) -> bool:
    """Sends `lines` as one sd_notify datagram; False when not run by systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    return bool(daemon.notify("\n".join(lines)))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec, or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Context(logging.Filter):
    """Stamps every record with the fields journald indexes (and the recent lines show)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshot_version = 0

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, Any] = record.__dict__
        fields.setdefault("component", "supervisor")
        record.COMPONENT = fields["component"]
        record.SNAPSHOT_VERSION = str(self.snapshot_version)
        if "operator_uid" in fields:
            record.OPERATOR_UID = str(fields["operator_uid"])
        return True


class RecentLines(logging.Handler):
    """The last RECENT_LINES records, for `adpop` clients and the console."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: collections.deque[LogLine] = collections.deque(maxlen=RECENT_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append({"time": record.created, "level": record.levelname.lower(),
                           "component": str(getattr(record, "component", "supervisor")),
                           "message": record.getMessage()})


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def setup_logging(debug: bool = False) -> tuple[Context, RecentLines]:
    """Routes the `adpop` loggers to journald or stderr, and to the recent-lines buffer."""
    context, recent = Context(), RecentLines()
    root = logging.getLogger("adpop")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    out: logging.Handler
    if under_systemd():
        out = journal.JournalHandler(SYSLOG_IDENTIFIER="adpop-supervisor")
    else:
        out = logging.StreamHandler(sys.stderr)
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(component)s: %(message)s")
        formatter.converter = time.gmtime  # this formatter's times in UTC, no one else's
        out.setFormatter(formatter)
    for handler in (out, recent):
        handler.addFilter(context)
        root.addHandler(handler)
    return context, recent
