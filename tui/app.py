"""`adpop console`: the operator's Textual console over the supervisor's control API.

Collection runs in a worker thread (tui.collector) and hands each round to the UI, which
renders it unless paused; tables are updated cell by cell so the cursor stays put. Every
footer entry, palette entry and help line comes from tui.actions.ACTIONS, every key from
tui.keys.KEYS, and each tab renders itself from the round (tui.tabs).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, ClassVar

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Input,
    Label,
    Static,
    TabbedContent,
)
from textual.worker import get_current_worker

from appliance.supervisor.client import ControlError, stale_for
from appliance.tuning.knobs import NOT_AS_DESIRED
from tui.actions import ACTIONS, Action, by_name
from tui.collector import Round, collect, write
from tui.keys import KEYS, label
from tui.tabs import TABS, RoundTab, View, age, sort_key

MIN_REFRESH, MAX_REFRESH = 0.25, 30.0


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
    # From the key map: each action's first key (in the footer when the action says so), and
    # its other keys quietly, before any widget sees them.
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        *(Binding(KEYS[a.name][0], a.name, a.title, show=a.footer) for a in ACTIONS),
        *(Binding(key, a.name, a.title, show=False, priority=True)
          for a in ACTIONS for key in KEYS[a.name][1:])]
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
        self.latest: Round | None = None
        self.rounds = 0
        self.connected: bool | None = None
        self.last_good: float | None = None  # monotonic time of the last answered round
        self.shown_stale = False  # whether the tiles are greyed out now
        # The filter, the sort orders and the graphs' history: what the tabs render with.
        self.view = View(clock)

    # --- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static("connecting...", id="banner")
        with TabbedContent(initial="overview"):
            for tab in TABS:
                yield tab()
        # Disabled while hidden, so it never takes the keys meant for the actions.
        yield Input(placeholder="filter (Escape clears)", id="filter", disabled=True)
        yield Footer()

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
            self.view.rps.append(float(engine.get("requests_per_second", 0.0)))
            self.view.p99.append(float(engine.get("latency_us", {}).get("p99", 0.0)))
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
        note = f"updated {age(stale)} ago" if stale else ""
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
            if self.latest is None:
                parts.append("waiting for the supervisor's first answer")
            else:
                status = self.latest.status
                parts.append(f"{status['pop']}: {'ready' if status['ready'] else 'NOT ready'}"
                             f" - {status['summary']}")
        parts.append(f"refresh {self.refresh_s:g} s")
        if self.paused:
            parts.append("PAUSED (collecting)")
        if self.read_only:
            parts.append("read-only")
        if self.view.filter_text:
            parts.append(f"filter: {self.view.filter_text}")
        banner.update(" | ".join(parts))

    def render_all(self, r: Round) -> None:
        for tab in self.query(RoundTab):
            tab.show(r, self.view)

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
        reverse = self.view.sorting.get(table.id) == (column, False)  # the same key again: reverse
        self.view.sorting[table.id] = (column, reverse)
        keys = list(table.columns)
        table.sort(keys[column], key=sort_key, reverse=reverse)
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
            self.view.filter_text = event.value.strip()
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
        from appliance.supervisor import client

        try:
            d = client.diff(self.socket_path, target)
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
