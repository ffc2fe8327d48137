"""The console's tabs: one widget class each, laying out its own widgets and rendering them
from one collected round (`show`). What they share besides the round is the View: the
console's clock, its filter, the sort order of each table and the graphs' history.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import DataTable, Label, Sparkline, Static, TabPane

from appliance.supervisor.client import pacing_view, sync_line
from appliance.tuning.knobs import NOT_AS_DESIRED
from tui.collector import Round

HISTORY = 300  # samples kept for the graphs (5 minutes at the default refresh)

# A tile's level: "ok", "warn" (amber: a state an operator chose, such as draining or a pin),
# "bad" or "off" (not run here).
MARKS = {"ok": "[green]ok[/]", "warn": "[#ffa500]NOTE[/]", "bad": "[red]FAIL[/]",
         "off": "[dim]off[/]"}


def _history() -> collections.deque[float]:
    return collections.deque(maxlen=HISTORY)


@dataclass
class View:
    """What every tab renders with besides the round."""

    clock: Callable[[], float]  # wall time, for ages
    filter_text: str = ""
    sorting: dict[str, tuple[int, bool]] = field(default_factory=dict)  # table id: column, reverse
    rps: collections.deque[float] = field(default_factory=_history)
    p99: collections.deque[float] = field(default_factory=_history)


def age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def level(ok: bool | None) -> str:
    return {True: "ok", False: "bad", None: "off"}[ok]


def sort_key(cell: Any) -> tuple[int, float, str]:
    """Numbers (with thousands commas, a leading v) sort as numbers, before text."""
    text = str(cell).replace(",", "").removeprefix("v")
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, str(cell))


def one_line(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value).splitlines()[0] if str(value) else ""
    return text if len(text) <= 40 else text[:37] + "..."


def new_table(table_id: str, columns: Iterable[str]) -> DataTable[str]:
    table: DataTable[str] = DataTable(id=table_id, cursor_type="row", zebra_stripes=True)
    for column in columns:
        table.add_column(column, key=column)
    return table


def fill_table(table: DataTable[str], rows: list[tuple[str, list[str]]], view: View,
               follow: bool = False) -> None:
    """Updates cells in place (the cursor stays), adds new rows, removes gone ones; keeps the
    operator's sort order, and with `follow` keeps the last line in view while the cursor is
    on it (new log lines)."""
    wanted = view.filter_text.lower()
    rows = [(k, cells) for k, cells in rows if not wanted or wanted in " ".join(cells).lower()]
    keys = [column.key for column in table.columns.values()]
    present = {row_key.value for row_key in table.rows if row_key.value is not None}
    fresh = {key for key, _ in rows}
    # On the last line: new lines follow into view; moved up: the view stays.
    following = table.row_count == 0 or table.cursor_row >= table.row_count - 1
    added = False
    for key in present - fresh:
        table.remove_row(key)
    for key, cells in rows:
        if key in present:
            for column, value in zip(keys, cells, strict=True):
                if table.get_cell(key, column) != value:
                    table.update_cell(key, column, value)
        else:
            table.add_row(*cells, key=key)
            added = True
    if table.id in view.sorting:
        index, reverse = view.sorting[table.id]
        table.sort(keys[index], key=sort_key, reverse=reverse)
    elif follow and added and following:
        table.move_cursor(row=table.row_count - 1, animate=False)
        table.scroll_end(animate=False)


class RoundTab(TabPane):
    """A tab that shows one collected round."""

    LABEL: ClassVar[str]  # the tab's title
    TAB_ID: ClassVar[str]  # its id: what action_show('...') names

    def __init__(self) -> None:
        super().__init__(self.LABEL, id=self.TAB_ID)

    def show(self, r: Round, view: View) -> None:
        raise NotImplementedError


class OverviewTab(RoundTab):
    LABEL, TAB_ID = "Overview", "overview"
    TILES = ("engine", "cache", "xdp", "tuning", "sync")

    def compose(self) -> ComposeResult:
        with Grid(id="tiles"):
            for name in self.TILES:
                yield Static(name, id=f"tile-{name}", classes="tile")
        with Horizontal():
            with Vertical(classes="graph"):
                yield Label("requests per second", id="rps-label")
                yield Sparkline([], id="rps")
            with Vertical(classes="graph"):
                yield Label("p99 latency (us)", id="p99-label")
                yield Sparkline([], id="p99")
        yield Static("", id="facts")

    def _tile(self, name: str, mark: str, lines: list[str]) -> None:
        tile = self.query_one(f"#tile-{name}", Static)
        tile.set_class(mark == "bad", "bad")
        tile.set_class(mark == "warn", "warn")
        tile.update(f"[b]{name}[/b] {MARKS[mark]}\n" + "\n".join(lines))

    def _parts(self, r: Round) -> None:
        components = r.status.get("components", {})
        # The spool is the engine's: its backlog past the warning turns the engine tile red
        # (the banner's summary carries the whole reason).
        events = r.status.get("events", {})
        for name in ("engine", "cache", "xdp"):
            comp = components.get(name)
            if comp is None:
                self._tile(name, "off", ["not run here (dev mode)"])
                continue
            lines = [comp.get("reason") or ""]
            if name == "engine":
                lines = [f"{comp.get('requests_per_second', 0):,.0f} req/s",
                         f"{comp.get('connections', 0)} connections",
                         comp.get("reason") or ("draining" if comp.get("draining") else "")]
                if events.get("ok") is False:
                    lines.append(f"spool backlog {events.get('backlog_bytes', 0) / 2**20:,.0f} "
                                 "MiB")
                    self._tile(name, "bad", lines)
                    continue
                if comp.get("ok") and comp.get("draining"):
                    self._tile(name, "warn", lines)  # drained on purpose: amber, not red
                    continue
            elif name == "xdp":
                lines = [", ".join(f"{nic} {mode or 'detached'}" for nic, mode in
                                   (comp.get("attached") or {}).items()) or "no NICs",
                         comp.get("reason") or ""]
            elif name == "cache":
                lines = [f"ping {comp.get('ping_ms', 0):.2f} ms",
                         f"{comp.get('used_memory', 0) / 2**20:.1f} MiB used",
                         comp.get("reason") or f"{comp.get('evicted_keys', 0)} evicted"]
            self._tile(name, level(bool(comp.get("ok"))), lines)
        tuning = r.status.get("tuning", {})
        if not tuning.get("enabled"):
            self._tile("tuning", "off", ["left alone (dev mode)"])
        else:
            drifting = tuning.get("drifting", [])
            self._tile("tuning", level(not drifting and not tuning.get("error")),
                       [f"{len(drifting)} drifting", f"{tuning.get('repairs', 0)} repairs",
                        tuning.get("error", "")])
        sync = r.status["sync"]
        mark, text = sync_line(sync)
        self._tile("sync", mark, [f"v{sync.get('version', 0)} {sync.get('state', '')}", text]
                   if mark != "ok" else [text])

    def show(self, r: Round, view: View) -> None:
        self._parts(r)
        self.query_one("#rps", Sparkline).data = list(view.rps)
        self.query_one("#p99", Sparkline).data = list(view.p99)
        last_rps = view.rps[-1] if view.rps else 0.0
        last_p99 = view.p99[-1] if view.p99 else 0.0
        self.query_one("#rps-label", Label).update(f"requests per second: {last_rps:,.0f}")
        self.query_one("#p99-label", Label).update(f"p99 latency: {last_p99:,.0f} us")
        snap = r.status["snapshot"]
        activated = snap.get("activated") or 0
        active_for = age(view.clock() - activated) if activated else "-"
        counters = r.xdp.get("counters") or {}
        drops = ", ".join(f"{k} {v['packets']:,}" for k, v in counters.items() if k != "pass")
        self.query_one("#facts", Static).update(
            f"snapshot [b]v{snap.get('version') or '-'}[/b] {str(snap.get('sha256', ''))[:16]}"
            f"  active for {active_for}\n"
            f"drops by reason: {drops or 'filter not loaded'}\n"
            f"event backlog: {r.events.get('closed_segments', 0)} closed segments, "
            f"{r.events.get('backlog_bytes', 0):,} bytes" + shipping_line(r.events)
            + budgets_line(r.status.get("pacing") or {}, view.clock()))


def shipping_line(events: Mapping[str, Any]) -> str:
    """The shipper's state in one line: rate, oldest waiting, last acknowledgement, trouble."""
    ship = events.get("shipping") or {}
    if not ship:
        return ""
    last = ship.get("last_ack") or 0
    acked = f"last ack {age(time.time() - last)} ago" if last else "nothing acknowledged yet"
    line = (f"\nshipping: {ship.get('events_per_second', 0):,.0f} events/s, oldest waiting "
            f"{ship.get('oldest_age_s', 0):.0f} s, {acked}, {ship.get('failures', 0)} failures")
    if ship.get("failing"):
        line += f" [red](retrying: {ship.get('last_error', '')})[/red]"
    if events.get("shedding"):
        line += "\n[red]spool full: answering no-fill (spool_full)[/red]"
    return line


def budgets_line(pacing: Mapping[str, Any], now: float) -> str:
    """Fleet budgets: the allowance, then each budgeted campaign's figures (at most five)."""
    if not pacing:
        return ""
    level, text, rows = pacing_view(dict(pacing), now)
    colour = {"ok": "", "warn": "yellow", "bad": "red"}[level]
    line = f"\nbudgets: [{colour}]{text}[/{colour}]" if colour else f"\nbudgets: {text}"
    shown = rows[:5]
    more = f"\n  ... and {len(rows) - 5} more" if len(rows) > 5 else ""
    return line + "".join(f"\n  {row}" for row in shown) + more


class SnapshotsTab(RoundTab):
    LABEL, TAB_ID = "Snapshots", "snapshots"

    def compose(self) -> ComposeResult:
        yield new_table("snapshots-table", ("version", "hash", "campaigns", "created",
                                            "activated", "state"))
        yield Static("", id="snapshot-diff")

    def show(self, r: Round, view: View) -> None:
        rows = []
        for s in reversed(r.snapshots.get("snapshots", [])):
            activated = s.get("activated")
            rows.append((str(s["version"]), [
                f"v{s['version']}", s["sha256"][:16], f"{s.get('campaigns', 0):,}",
                time.strftime("%Y-%m-%d %H:%M", time.gmtime(s["created"])),
                age(view.clock() - activated) + " ago" if activated else "-",
                s.get("state", "active" if s.get("active") else "retained")]))
        fill_table(self.query_one("#snapshots-table", DataTable), rows, view)


class TuningTab(RoundTab):
    LABEL, TAB_ID = "Tuning", "tuning"

    def compose(self) -> ComposeResult:
        yield Static("", id="tuning-summary")
        yield new_table("tuning-table", ("knob", "status", "current", "desired", "drift"))

    def show(self, r: Round, view: View) -> None:
        status = r.tuning.get("status", {})
        knobs = r.tuning.get("knobs", [])
        drift_counts = status.get("drift", {})
        summary = ("[b]drift watch on[/b]: " + f"{len(status.get('drifting', []))} drifting, "
                   f"{status.get('repairs', 0)} repairs, irqbalance {status.get('irqbalance')}"
                   if status.get("enabled") else f"drift watch off: {status.get('reason', '')}")
        changes = sum(1 for k in knobs if k["status"] in NOT_AS_DESIRED)
        error = r.tuning.get("error")
        self.query_one("#tuning-summary", Static).update(
            f"{summary}\n{changes} of {len(knobs)} knobs differ from the plan"
            + (f"\n[red]{error}[/]" if error else ""))
        fill_table(self.query_one("#tuning-table", DataTable), [
            (k["name"], [k["name"], k["status"], one_line(k["current"]),
                         one_line(k["desired"]), str(drift_counts.get(k["name"], 0))])
            for k in knobs], view)


class XdpTab(RoundTab):
    LABEL, TAB_ID = "XDP", "xdp"

    def compose(self) -> ComposeResult:
        yield Static("", id="xdp-summary")
        with Horizontal():
            yield new_table("xdp-counters", ("reason", "packets", "bytes"))
            yield new_table("xdp-top", ("source", "drops"))

    def show(self, r: Round, view: View) -> None:
        x = r.xdp
        if not x.get("loaded"):
            self.query_one("#xdp-summary", Static).update(
                f"filter {x.get('reason', 'not loaded')}")
        else:
            attached = ", ".join(f"{nic} ({v.get('mode')})"
                                 for nic, v in (x.get("attached") or {}).items())
            blocked = x.get("blocklist", {})
            self.query_one("#xdp-summary", Static).update(
                f"attached: {attached or 'nowhere'} | blocklist: {blocked.get('ipv4', 0):,} "
                f"IPv4 + {blocked.get('ipv6', 0):,} IPv6 | rate {x.get('rate_pps') or 'off'}")
        fill_table(self.query_one("#xdp-counters", DataTable), [
            (reason, [reason, f"{c['packets']:,}", f"{c['bytes']:,}"])
            for reason, c in (x.get("counters") or {}).items()], view)
        fill_table(self.query_one("#xdp-top", DataTable),
                   [(t["source"], [t["source"], f"{t['drops']:,}"]) for t in x.get("top") or []],
                   view)


class LogsTab(RoundTab):
    LABEL, TAB_ID = "Logs", "logs"

    def compose(self) -> ComposeResult:
        yield new_table("logs-table", ("time", "level", "component", "message"))

    def show(self, r: Round, view: View) -> None:
        rows = []
        for n, line in enumerate(r.logs):
            stamp = time.strftime("%H:%M:%S", time.gmtime(line["time"]))
            rows.append((f"{line['time']:.6f}-{n}", [stamp, line["level"], line["component"],
                                                       line["message"]]))
        fill_table(self.query_one("#logs-table", DataTable), rows, view, follow=True)


TABS: tuple[type[RoundTab], ...] = (OverviewTab, SnapshotsTab, TuningTab, XdpTab, LogsTab)
