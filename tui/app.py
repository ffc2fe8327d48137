"""`adpop console`: the operator's Textual console over the supervisor's control API.

Collection runs in a worker thread (tui.collector) and hands each round to the UI, which
renders it unless paused; tables are updated cell by cell so the cursor stays put. Every key,
palette entry and help line comes from tui.actions.ACTIONS.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, ClassVar

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Input,
    Label,
    Sparkline,
    Static,
    TabbedContent,
    TabPane,
)
from textual.worker import get_current_worker

from appliance.supervisor.client import ControlError, stale_for, sync_line
from appliance.tuning.knobs import NOT_AS_DESIRED
from tui.actions import ACTIONS, Action, by_name, label
from tui.collector import Round, collect, write

HISTORY = 300  # samples kept for the graphs (5 minutes at the default refresh)
MIN_REFRESH, MAX_REFRESH = 0.25, 30.0
TABS = ("overview", "snapshots", "tuning", "xdp", "logs")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# A tile's level: "ok", "warn" (amber: a state an operator chose, such as draining or a pin),
# "bad" or "off" (not run here).
MARKS = {"ok": "[green]ok[/]", "warn": "[#ffa500]NOTE[/]", "bad": "[red]FAIL[/]",
         "off": "[dim]off[/]"}


def _level(ok: bool | None) -> str:
    return {True: "ok", False: "bad", None: "off"}[ok]


def _sort_key(cell: Any) -> tuple[int, float, str]:
    """Numbers (with thousands commas, a leading v) sort as numbers, before text."""
    text = str(cell).replace(",", "").removeprefix("v")
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, str(cell))


# --- modal screens ---------------------------------------------------------------------------


def _campaigns(verb: str, names: list[str], shown: int = 8) -> str:
    """One dialog line naming up to `shown` campaigns ("" for none)."""
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{verb}: {', '.join(names[:shown])}{more}\n"


class ConfirmScreen(ModalScreen[bool]):
    """What a dangerous action will do; confirmed by typing `typed` when given, else by y."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "cancel", "Cancel")]

    def __init__(self, what: str, typed: str = "") -> None:
        super().__init__()
        self.what, self.typed = what, typed

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.what, id="what")
            if self.typed:
                yield Label(f"Type [b]{self.typed}[/b] to confirm:")
                yield Input(id="typed")
            else:
                yield Label("Press [b]y[/b] to confirm, Escape to cancel.")
            with Horizontal(id="buttons"):
                yield Button("Confirm", id="confirm", variant="error")
                yield Button("Cancel", id="cancel")

    def on_key(self, event: Any) -> None:
        if not self.typed and event.key == "y":
            self.dismiss(True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._try_confirm()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "confirm":
            self._try_confirm()
        else:
            self.dismiss(False)

    def _try_confirm(self) -> None:
        if self.typed and self.query_one("#typed", Input).value.strip() != self.typed:
            self.notify(f"type {self.typed} exactly to confirm", severity="warning")
            return
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class PromptScreen(ModalScreen[str]):
    """One line of input (a CIDR); empty on Escape."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, placeholder: str) -> None:
        super().__init__()
        self.question, self.placeholder = question, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            yield Input(placeholder=self.placeholder, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss("")


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, actions: Iterable[Action]) -> None:
        super().__init__()
        self.actions = list(actions)

    def compose(self) -> ComposeResult:
        table: DataTable[str] = DataTable(id="help-table", cursor_type="none")
        table.add_columns("key", "action", "what it does", "")
        for a in self.actions:
            kind = "dangerous: confirm" if a.dangerous else "writes" if a.writes else ""
            table.add_row(label(a), a.title, a.help, kind)
        with Vertical(id="dialog"):
            yield Label("[b]adpop console[/b]: every action (Escape closes)")
            yield table

    def action_close(self) -> None:
        self.dismiss(None)


class ActionCommands(Provider):
    """The command palette: the same action table."""

    async def discover(self) -> Hits:
        app = self.app
        assert isinstance(app, ConsoleApp)
        for action in app.visible_actions():
            yield DiscoveryHit(action.title, partial(app.run_action, action.name), help=action.help)

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, ConsoleApp)
        matcher = self.matcher(query)
        for action in app.visible_actions():
            score = matcher.match(action.title)
            if score > 0:
                yield Hit(score, matcher.highlight(action.title),
                          partial(app.run_action, action.name), help=action.help)


# --- the app -----------------------------------------------------------------------------------


class ConsoleApp(App[None]):
    TITLE = "adpop console"
    CSS_PATH = "app.tcss"  # beside this file
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        *(Binding(a.key, a.name, a.title, show=a.key not in ("plus", "minus", "1", "2", "3", "4",
                                                             "5") and not a.name.startswith("sort"))
          for a in ACTIONS),
        *(Binding(a.also, a.name, a.title, show=False, priority=True) for a in ACTIONS if a.also)]
    COMMANDS = App.COMMANDS | {ActionCommands}

    def __init__(self, socket_path: str, read_only: bool = False, refresh: float = 1.0,
                 clock: Callable[[], float] = time.time, title: str = "") -> None:
        super().__init__()
        self.socket_path = socket_path
        self.read_only = read_only
        self.refresh_s = min(MAX_REFRESH, max(MIN_REFRESH, refresh))
        self.clock = clock
        self.sub_title = title or socket_path
        self.paused = False
        self.filter_text = ""
        self.latest: Round | None = None
        self.rounds = 0
        self.connected: bool | None = None
        self.last_good: float | None = None  # monotonic time of the last answered round
        self.shown_stale = False  # whether the tiles are greyed out now
        self.sorting: dict[str, tuple[int, bool]] = {}  # table id -> (column, reverse)
        self.rps: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self.p99: collections.deque[float] = collections.deque(maxlen=HISTORY)

    # --- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static("connecting...", id="banner")
        with TabbedContent(initial="overview"):
            with TabPane("Overview", id="overview"):
                with Grid(id="tiles"):
                    for name in ("engine", "cache", "xdp", "tuning", "sync"):
                        yield Static(name, id=f"tile-{name}", classes="tile")
                with Horizontal():
                    with Vertical(classes="graph"):
                        yield Label("requests per second", id="rps-label")
                        yield Sparkline([], id="rps")
                    with Vertical(classes="graph"):
                        yield Label("p99 latency (us)", id="p99-label")
                        yield Sparkline([], id="p99")
                yield Static("", id="facts")
            with TabPane("Snapshots", id="snapshots"):
                yield self._table("snapshots-table", ("version", "hash", "campaigns", "created",
                                                      "activated", "state"))
                yield Static("", id="snapshot-diff")
            with TabPane("Tuning", id="tuning"):
                yield Static("", id="tuning-summary")
                yield self._table("tuning-table", ("knob", "status", "current", "desired",
                                                   "drift"))
            with TabPane("XDP", id="xdp"):
                yield Static("", id="xdp-summary")
                with Horizontal():
                    yield self._table("xdp-counters", ("reason", "packets", "bytes"))
                    yield self._table("xdp-top", ("source", "drops"))
            with TabPane("Logs", id="logs"):
                yield self._table("logs-table", ("time", "level", "component", "message"))
        # Disabled while hidden, so it never takes the keys meant for the actions.
        yield Input(placeholder="filter (Escape clears)", id="filter", disabled=True)
        yield Footer()

    @staticmethod
    def _table(table_id: str, columns: Iterable[str]) -> DataTable[str]:
        table: DataTable[str] = DataTable(id=table_id, cursor_type="row", zebra_stripes=True)
        for column in columns:
            table.add_column(column, key=column)
        return table

    def on_mount(self) -> None:
        self.collect_loop()
        self.set_interval(1.0, self.render_staleness)

    # --- collection (worker thread) --------------------------------------------------------

    @work(thread=True, exclusive=True, group="collect")
    def collect_loop(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled:
            result = collect(self.socket_path)
            if worker.is_cancelled:
                return
            self.call_from_thread(self.apply_round, result)
            deadline = time.monotonic() + self.refresh_s
            while not worker.is_cancelled and time.monotonic() < deadline:
                time.sleep(0.05)

    def apply_round(self, result: Round) -> None:
        """Keeps the round (and the graph samples) always; renders unless paused."""
        self.rounds += 1
        self.connected = result.ok
        if result.ok:
            self.latest = result
            self.last_good = time.monotonic()
            engine = result.status.get("components", {}).get("engine", {})
            self.rps.append(float(engine.get("requests_per_second", 0.0)))
            self.p99.append(float(engine.get("latency_us", {}).get("p99", 0.0)))
        self.render_banner(result)
        if not self.paused and self.latest is not None:
            self.render_all(self.latest)
        self.render_staleness()

    # --- rendering -------------------------------------------------------------------------

    def stale_seconds(self) -> float:
        """How old the figures on screen are, once older than two refreshes (else 0): the
        console's own last answered round, or the supervisor's last health round."""
        if self.last_good is None or self.latest is None:
            return 0.0
        age = time.monotonic() - self.last_good
        own = age if age > 2 * self.refresh_s else 0.0
        return max(own, stale_for(self.latest.status, self.latest.at + age))

    def render_staleness(self) -> None:
        """Greys out every tile and graph, each saying how old it is, while data is stale."""
        stale = self.stale_seconds()
        if not stale and not self.shown_stale:
            return  # the common case, every second: nothing to repaint
        self.shown_stale = bool(stale)
        note = f"updated {_age(stale)} ago" if stale else ""
        for widget in (*self.query(".tile"), *self.query(".graph")):
            widget.set_class(bool(stale), "stale")
            # Assigned only when it changes: every assignment repaints the widget, and this
            # runs every second.
            if widget.border_subtitle != note:
                widget.border_subtitle = note
    def render_banner(self, result: Round | None = None) -> None:
        banner = self.query_one("#banner", Static)
        parts = [f"[b]adpop console[/b] {self.sub_title}"]
        if self.connected is False and result is not None:
            banner.add_class("down")
            # The banner grows to hold the whole message (.down): the reason is what matters.
            parts.append(f"DISCONNECTED from {self.socket_path}: {result.error}; "
                         f"retrying every {self.refresh_s:g} s")
        else:
            banner.remove_class("down")
            status = self.latest.status if self.latest else {}
            parts.append(f"{status.get('pop', '?')}: "
                         f"{'ready' if status.get('ready') else 'NOT ready'} - "
                         f"{status.get('summary', '')}")
        parts.append(f"refresh {self.refresh_s:g} s")
        if self.paused:
            parts.append("PAUSED (collecting)")
        if self.read_only:
            parts.append("read-only")
        if self.filter_text:
            parts.append(f"filter: {self.filter_text}")
        banner.update(" | ".join(parts))

    def render_all(self, r: Round) -> None:
        self.render_overview(r)
        self.render_snapshots(r)
        self.render_tuning(r)
        self.render_xdp(r)
        self.render_logs(r)

    def _tile(self, name: str, level: str, lines: list[str]) -> None:
        tile = self.query_one(f"#tile-{name}", Static)
        tile.set_class(level == "bad", "bad")
        tile.set_class(level == "warn", "warn")
        tile.update(f"[b]{name}[/b] {MARKS[level]}\n" + "\n".join(lines))

    def render_overview(self, r: Round) -> None:
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
            self._tile(name, _level(bool(comp.get("ok"))), lines)
        tuning = r.status.get("tuning", {})
        if not tuning.get("enabled"):
            self._tile("tuning", "off", ["left alone (dev mode)"])
        else:
            drifting = tuning.get("drifting", [])
            self._tile("tuning", _level(not drifting and not tuning.get("error")),
                       [f"{len(drifting)} drifting", f"{tuning.get('repairs', 0)} repairs",
                        tuning.get("error", "")])
        sync = r.status.get("sync", {})
        level, text = sync_line(sync)
        self._tile("sync", level, [f"v{sync.get('version', 0)} {sync.get('state', '')}", text]
                   if level != "ok" else [text])
        self.query_one("#rps", Sparkline).data = list(self.rps)
        self.query_one("#p99", Sparkline).data = list(self.p99)
        last_rps = self.rps[-1] if self.rps else 0.0
        last_p99 = self.p99[-1] if self.p99 else 0.0
        self.query_one("#rps-label", Label).update(f"requests per second: {last_rps:,.0f}")
        self.query_one("#p99-label", Label).update(f"p99 latency: {last_p99:,.0f} us")
        snap = r.status.get("snapshot", {})
        activated = snap.get("activated") or 0
        age = _age(self.clock() - activated) if activated else "-"
        counters = r.xdp.get("counters") or {}
        drops = ", ".join(f"{k} {v['packets']:,}" for k, v in counters.items() if k != "pass")
        self.query_one("#facts", Static).update(
            f"snapshot [b]v{snap.get('version') or '-'}[/b] {str(snap.get('sha256', ''))[:16]}"
            f"  active for {age}\n"
            f"drops by reason: {drops or 'filter not loaded'}\n"
            f"event backlog: {r.events.get('closed_segments', 0)} closed segments, "
            f"{r.events.get('backlog_bytes', 0):,} bytes")

    def _sync_table(self, table_id: str, rows: list[tuple[str, list[str]]]) -> None:
        """Updates cells in place (the cursor stays), adds new rows, removes gone ones."""
        table = self.query_one(f"#{table_id}", DataTable)
        wanted = self.filter_text.lower()
        rows = [(k, cells) for k, cells in rows
                if not wanted or wanted in " ".join(cells).lower()]
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
        if table_id in self.sorting:
            index, reverse = self.sorting[table_id]
            table.sort(keys[index], key=_sort_key, reverse=reverse)
        elif table_id == "logs-table" and added and following:
            table.move_cursor(row=table.row_count - 1, animate=False)
            table.scroll_end(animate=False)

    def render_snapshots(self, r: Round) -> None:
        rows = []
        for s in reversed(r.snapshots.get("snapshots", [])):
            activated = s.get("activated")
            rows.append((str(s["version"]), [
                f"v{s['version']}", s["sha256"][:16], f"{s.get('campaigns', 0):,}",
                time.strftime("%Y-%m-%d %H:%M", time.gmtime(s["created"])),
                _age(self.clock() - activated) + " ago" if activated else "-",
                s.get("state", "active" if s.get("active") else "retained")]))
        self._sync_table("snapshots-table", rows)

    def render_tuning(self, r: Round) -> None:
        status = r.tuning.get("status", {})
        knobs = r.tuning.get("knobs", [])
        drift_counts = status.get("drift", {})
        summary = ("[b]drift watch on[/b]: " + f"{len(status.get('drifting', []))} drifting, "
                   f"{status.get('repairs', 0)} repairs, irqbalance {status.get('irqbalance')}"
                   if status.get("enabled") else f"drift watch off: {status.get('reason', '')}")
        changes = sum(1 for k in knobs if k["status"] in NOT_AS_DESIRED)
        self.query_one("#tuning-summary", Static).update(
            f"{summary}\n{changes} of {len(knobs)} knobs differ from the plan"
            + (f"\n[red]{r.tuning['error']}[/]" if r.tuning.get("error") else ""))
        self._sync_table("tuning-table", [
            (k["name"], [k["name"], k["status"], _one_line(k["current"]),
                         _one_line(k["desired"]), str(drift_counts.get(k["name"], 0))])
            for k in knobs])

    def render_xdp(self, r: Round) -> None:
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
        self._sync_table("xdp-counters", [
            (reason, [reason, f"{c['packets']:,}", f"{c['bytes']:,}"])
            for reason, c in (x.get("counters") or {}).items()])
        self._sync_table("xdp-top", [(t["source"], [t["source"], f"{t['drops']:,}"])
                                     for t in x.get("top") or []])

    def render_logs(self, r: Round) -> None:
        rows = []
        for n, line in enumerate(r.logs):
            stamp = time.strftime("%H:%M:%S", time.gmtime(line["time"]))
            rows.append((f"{line['time']:.6f}-{n}", [stamp, line["level"], line["component"],
                                                       line["message"]]))
        self._sync_table("logs-table", rows)

    # --- the action table --------------------------------------------------------------------

    def visible_actions(self) -> list[Action]:
        return [a for a in ACTIONS if not (self.read_only and a.writes)]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Read-only hides every write: no key, no footer entry, no palette entry.
        return not (self.read_only and any(a.writes and a.name == action for a in ACTIONS))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from ()  # the palette is the action table, nothing else

    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self._focus_table()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._focus_table()

    def _tab_table(self) -> DataTable[str] | None:
        """The active tab's first table (the overview has none)."""
        pane = self.query_one(TabbedContent).active_pane
        tables = list(pane.query(DataTable)) if pane is not None else []
        return tables[0] if tables else None

    def _active_table(self) -> DataTable[str] | None:
        """The table the keys act on: the focused one, else the active tab's first."""
        if isinstance(self.focused, DataTable) and self.focused.id != "help-table":
            return self.focused
        return self._tab_table()

    def _focus_table(self) -> None:
        # Arrows work at once in the chosen tab; on the overview nothing is focused, so no
        # hidden table keeps the keys.
        table = self._tab_table()
        if table is not None:
            table.focus()
        else:
            self.set_focus(None)

    def action_sort(self, column: int) -> None:
        table = self._active_table()
        if table is None or table.id is None or column >= len(table.columns):
            self.notify(f"no column {column + 1} to sort here", severity="warning")
            return
        reverse = self.sorting.get(table.id) == (column, False)  # the same key again: reverse
        self.sorting[table.id] = (column, reverse)
        keys = list(table.columns)
        table.sort(keys[column], key=_sort_key, reverse=reverse)
        name = table.columns[keys[column]].label
        self.notify(f"sorted by {name}, {'descending' if reverse else 'ascending'}")

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.render_banner()
        if not self.paused and self.latest is not None:
            self.render_all(self.latest)

    def action_faster(self) -> None:
        self.refresh_s = max(MIN_REFRESH, self.refresh_s / 2)
        self.render_banner()

    def action_slower(self) -> None:
        self.refresh_s = min(MAX_REFRESH, self.refresh_s * 2)
        self.render_banner()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.disabled = False
        box.add_class("shown")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value.strip()
            if self.latest is not None and not self.paused:
                self.render_all(self.latest)
            self.render_banner()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_class("shown"):
            box.value = ""
            box.remove_class("shown")
            box.disabled = True
            self.set_focus(None)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.visible_actions()))

    # --- writes --------------------------------------------------------------------------------

    @work(thread=True, group="write")
    def send(self, route: str, body: dict[str, Any] | None = None) -> None:
        try:
            message = write(self.socket_path, route, body)
            self.call_from_thread(self.notify, message)
        except ControlError as exc:
            self.call_from_thread(self.notify, exc.message, severity="error")

    def confirm(self, action: Action, what: str, typed: str, route: str,
                body: dict[str, Any] | None = None) -> None:
        def done(ok: bool | None) -> None:
            if ok:
                self.send(route, body)
            else:
                self.notify(f"{action.title}: cancelled")
        self.push_screen(ConfirmScreen(what, typed), done)

    def action_sync_now(self) -> None:
        self.send("/v1/sync-now")

    def action_undrain(self) -> None:
        self.send("/v1/undrain")

    def action_drain(self) -> None:
        pop = (self.latest.status.get("pop", "") if self.latest else "") or "this PoP"
        self.confirm(by_name("drain"), f"[b]Drain {pop}[/b]: the engine stops taking new "
                     "connections and /healthz answers 503, so the load balancer moves "
                     "traffic away; requests in flight finish.", pop, "/v1/drain")

    def refuse(self, action: Action, why: str) -> None:
        """An action that cannot succeed is refused before any confirmation."""
        self.notify(f"{action.title} refused: {why}", severity="error")

    def action_apply_tuning(self) -> None:
        tuning = self.latest.status.get("tuning", {}) if self.latest else {}
        if not tuning.get("enabled"):
            self.refuse(by_name("apply_tuning"), tuning.get("reason") or
                        "the supervisor does not tune this host")
            return
        knobs = self.latest.tuning.get("knobs", []) if self.latest else []
        drifting = [k["name"] for k in knobs if k["status"] in NOT_AS_DESIRED]
        listing = ", ".join(drifting[:8]) + (" ..." if len(drifting) > 8 else "")
        self.confirm(by_name("apply_tuning"),
                     f"[b]Apply tuning[/b]: adpop-tune.service re-applies the plan; "
                     f"{len(drifting)} knobs differ now{': ' + listing if listing else ''}.",
                     "", "/v1/tuning/apply")

    def action_rollback(self) -> None:
        if self.latest is None:
            return
        snaps = self.latest.snapshots
        active = snaps.get("active")
        older = sorted(s["version"] for s in snaps.get("snapshots", [])
                       if active is not None and s["version"] < active)
        # As `adpop rollback`: the version below the active one. A row the operator picked on
        # the Snapshots tab wins only when it is older too: a rollback never rolls forward.
        target: int | None = older[-1] if older else None
        table = self.query_one("#snapshots-table", DataTable)
        if self.query_one(TabbedContent).active == "snapshots" and table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            if key is not None and int(key) in older:
                target = int(key)
        if target is None or active is None:
            self.notify("no retained version below the active one to roll back to",
                        severity="warning")
            return
        self.rollback_diff(active, target)

    @work(thread=True, group="write")
    def rollback_diff(self, active: int, target: int) -> None:
        """Reads what the rollback would undo (off the UI thread), then asks."""
        from appliance.supervisor.client import call

        try:
            d = call(self.socket_path, "GET", f"/v1/snapshots/diff?version={target}")
            # What v{active} added, the rollback removes, and the other way round.
            change = (f"v{active} added {len(d['added'])}, removed {len(d['removed'])} and "
                      f"changed {len(d['changed'])} campaigns against v{target}; a rollback "
                      "undoes that.\n" + _campaigns("Removes", d["added"]) +
                      _campaigns("Adds back", d["removed"]) + _campaigns("Reverts", d["changed"]))
        except ControlError as exc:
            change = f"(what changed is unknown: {exc.message})"
        what = f"[b]Roll back from v{active} to v{target}[/b]. {change}"
        self.call_from_thread(self.confirm, by_name("rollback"), what, str(target),
                              "/v1/rollback", {"to": target})

    def _cidr_refusal(self, cidr: str) -> str:
        """Why blocking or unblocking `cidr` cannot work here ("" when it can)."""
        if self.latest is None or not self.latest.xdp.get("loaded"):
            return ("the XDP filter is not loaded on this PoP "
                    f"({(self.latest.xdp.get('reason') if self.latest else '') or 'no data'})")
        if not cidr:
            return ""
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            return f"{cidr!r} is not a valid CIDR ({exc})"
        return ""

    def action_block(self) -> None:
        action = by_name("block")
        if why := self._cidr_refusal(""):
            self.refuse(action, why)
            return

        def asked(cidr: str | None) -> None:
            if not cidr:
                return
            if why := self._cidr_refusal(cidr):
                self.refuse(action, why)
                return
            self.confirm(action, f"[b]Block {cidr}[/b]: every packet from it is dropped at "
                         "the NIC by the XDP filter.", "", "/v1/xdp/block", {"cidrs": [cidr]})
        self.push_screen(PromptScreen("Block which source range?", "198.18.0.0/15"), asked)

    def action_unblock(self) -> None:
        action = by_name("unblock")
        if why := self._cidr_refusal(""):
            self.refuse(action, why)
            return

        def asked(cidr: str | None) -> None:
            if not cidr:
                return
            if why := self._cidr_refusal(cidr):
                self.refuse(action, why)
                return
            self.send("/v1/xdp/unblock", {"cidrs": [cidr]})
        self.push_screen(PromptScreen("Unblock which range?", "198.18.0.0/15"), asked)


def _one_line(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value).splitlines()[0] if str(value) else ""
    return text if len(text) <= 40 else text[:37] + "..."
