"""The operator console, driven by Textual's pilot against a fake control API: each screen
renders its data, each action sends the right request, dangerous ones need confirmation,
read-only hides the writes, a lost supervisor is shown and found again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from tests.fake_control import NOW, FakeControl
from tui.actions import ACTIONS
from tui.app import ConfirmScreen, ConsoleApp, PromptScreen
from tui.keys import KEYS, KeyMapError, check

pytestmark = pytest.mark.unit

SIZE = (120, 40)


def console(fake: FakeControl, **kwargs: Any) -> ConsoleApp:
    return ConsoleApp(str(fake.path), clock=lambda: NOW, refresh=kwargs.pop("refresh", 60.0),
                      **kwargs)


async def until(pilot: Pilot[None], what: str, check: Callable[[], bool],
                timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run(app: ConsoleApp, scenario: Callable[[Pilot[None]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, "the first round", lambda: app.latest is not None)
            await pilot.pause()
            await scenario(pilot)
    asyncio.run(main())


def text(app: ConsoleApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def cells(app: ConsoleApp, table_id: str) -> list[list[str]]:
    table = app.query_one(f"#{table_id}", DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_each_screen_renders_its_data(fake: FakeControl) -> None:
    app = console(fake)

    async def scenario(pilot: Pilot[None]) -> None:
        assert "151,234 req/s" in text(app, "#tile-engine")
        assert "ping 0.12 ms" in text(app, "#tile-cache")
        assert "1 drifting" in text(app, "#tile-tuning")
        assert "v12 active" in text(app, "#tile-sync")
        facts = text(app, "#facts")
        assert "v12" in facts and "active for 62 min" in facts and "blocked 12,345" in facts
        assert "3 closed segments" in facts
        await pilot.press("2")
        assert cells(app, "snapshots-table")[0][:3] == ["v12", "12abababababababab"[:16],
                                                       "100,012"]
        await pilot.press("3")
        assert ["sysctl vm.swappiness", "drift", "60", "10", "2"] in cells(app, "tuning-table")
        await pilot.press("4")
        assert ["blocked", "12,345", "740,700"] in cells(app, "xdp-counters")
        assert cells(app, "xdp-top")[0] == ["198.18.7.7", "6,789"]
        assert "100,000 IPv4" in text(app, "#xdp-summary")
        await pilot.press("5")
        assert any("repairing" in row[3] for row in cells(app, "logs-table"))

    run(app, scenario)


def test_filter_narrows_tables_and_cursor_stays(fake: FakeControl) -> None:
    app = console(fake, refresh=0.25)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("5")
        table = app.query_one("#logs-table", DataTable)
        assert app.focused is table, "choosing a tab puts the keys in its table"
        assert table.cursor_row == 4, "the logs open on their newest line"
        await pilot.press("up", "up")
        seen = app.rounds
        await until(pilot, "two more rounds", lambda: app.rounds >= seen + 2)
        assert table.cursor_row == 2, "updates in place keep the cursor"
        await pilot.press("slash")
        await pilot.press(*"drift")
        assert len(cells(app, "logs-table")) == 1
        await pilot.press("escape")
        await until(pilot, "the filter to clear", lambda: len(cells(app, "logs-table")) == 5)

    run(app, scenario)


def test_actions_send_their_requests(fake: FakeControl) -> None:
    app = console(fake)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("s")
        await until(pilot, "sync-now", lambda: ("/v1/sync-now", None) in fake.writes)
        await pilot.press("u")
        await until(pilot, "undrain", lambda: ("/v1/undrain", None) in fake.writes)
        await pilot.press("k")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"198.18.7.0/24", "enter")
        await until(pilot, "unblock", lambda: ("/v1/xdp/unblock",
                                               {"cidrs": ["198.18.7.0/24"]}) in fake.writes)

    run(app, scenario)


def test_dangerous_actions_need_confirmation(fake: FakeControl) -> None:
    app = console(fake)

    async def scenario(pilot: Pilot[None]) -> None:
        # Drain: the PoP's name must be typed; a wrong name does nothing.
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen) and app.screen.typed == "pop-fra-1"
        await pilot.press(*"pop-x", "enter")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not fake.writes
        await pilot.press("d", *"pop-fra-1", "enter")
        await until(pilot, "drain", lambda: ("/v1/drain", None) in fake.writes)

        # Rollback of the selected row: says what it undoes, the version typed in.
        await pilot.press("2")
        app.query_one("#snapshots-table", DataTable).focus()
        await pilot.press("down")  # v11
        await pilot.press("r")
        await until(pilot, "the confirmation", lambda: isinstance(app.screen, ConfirmScreen))
        assert isinstance(app.screen, ConfirmScreen)
        assert "v12 added 1, removed 0 and changed 2" in app.screen.what
        await pilot.press(*"11", "enter")
        await until(pilot, "rollback", lambda: ("/v1/rollback", {"to": 11}) in fake.writes)

        # Apply tuning: shows the drift, y confirms.
        await pilot.press("a")
        assert isinstance(app.screen, ConfirmScreen) and "sysctl vm.swappiness" in \
            app.screen.what
        await pilot.press("y")
        await until(pilot, "apply", lambda: ("/v1/tuning/apply", None) in fake.writes)

        # Block: the range asked, then confirmed; cancelled sends nothing.
        await pilot.press("b", *"198.18.9.0/24", "enter")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await pilot.press("b", *"198.18.9.0/24", "enter", "y")
        await until(pilot, "block", lambda: ("/v1/xdp/block",
                                             {"cidrs": ["198.18.9.0/24"]}) in fake.writes)
        assert sum(1 for route, _ in fake.writes if route == "/v1/xdp/block") == 1

    run(app, scenario)


def test_read_only_hides_every_write(fake: FakeControl) -> None:
    app = console(fake, read_only=True)

    async def scenario(pilot: Pilot[None]) -> None:
        for action in ACTIONS:
            if action.writes:
                await pilot.press(KEYS[action.name][0])
                await pilot.pause()
                assert not isinstance(app.screen, ConfirmScreen | PromptScreen)
        assert not fake.writes
        visible = {a.name for a in app.visible_actions()}
        assert "drain" not in visible and "rollback" not in visible and "pause" in visible
        assert "read-only" in text(app, "#banner")

    run(app, scenario)


def test_pause_keeps_collecting_and_refresh_changes(fake: FakeControl) -> None:
    app = console(fake, refresh=0.25)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("p")
        assert "PAUSED" in text(app, "#banner")
        seen = app.rounds
        await until(pilot, "collection while paused", lambda: app.rounds >= seen + 2)
        await pilot.press("p", "minus")
        assert app.refresh_s == 0.5 and "PAUSED" not in text(app, "#banner")
        await pilot.press("plus", "plus")
        assert app.refresh_s == 0.25  # the floor

    run(app, scenario)


def test_disconnect_is_shown_and_recovered(fake: FakeControl) -> None:
    app = console(fake, refresh=0.25)

    async def scenario(pilot: Pilot[None]) -> None:
        fake.stop()
        await until(pilot, "the disconnect", lambda: app.connected is False)
        assert "DISCONNECTED" in text(app, "#banner")
        assert "v12" in text(app, "#facts"), "the last data stays on screen"
        fake.start()
        await until(pilot, "the reconnect", lambda: app.connected is True)
        assert "DISCONNECTED" not in text(app, "#banner")

    run(app, scenario)


def test_console_on_a_real_supervisor(up: Any) -> None:
    """Against `adpop up`: the console shows the PoP's live snapshot version."""
    app = ConsoleApp(up.control, refresh=0.5)

    async def scenario(pilot: Pilot[None]) -> None:
        assert app.latest is not None and app.connected
        version = up.status()["snapshot"]["version"]
        assert f"snapshot v{version}" in text(app, "#facts")
        assert "engine ok" in text(app, "#tile-engine")
        await pilot.press("2")
        assert cells(app, "snapshots-table")[0][0] == f"v{version}"
        assert "left alone (dev mode)" in text(app, "#tile-tuning")

    run(app, scenario)


def test_a_spool_backlog_turns_the_engine_tile_red(fake: FakeControl,
                                                   monkeypatch: Any) -> None:
    from tests.fake_control import STATUS

    reason = ("events: spool backlog 341 MiB in 90 closed segments passes "
              "engine.spool_warn_bytes (256 MiB)")
    monkeypatch.setitem(STATUS, "events", {"ok": False, "reason": reason,
                                           "backlog_bytes": 341 << 20, "closed_segments": 90})
    monkeypatch.setitem(STATUS, "summary", f"degraded (v12): {reason}")
    app = console(fake)

    async def scenario(pilot: Pilot[None]) -> None:
        tile = app.query_one("#tile-engine", Static)
        assert tile.has_class("bad") and "spool backlog 341 MiB" in text(app, "#tile-engine")
        assert "passes engine.spool_warn_bytes" in text(app, "#banner")
        assert not app.query_one("#tile-cache", Static).has_class("bad")

    run(app, scenario)


def test_rollback_defaults_to_the_version_below_and_names_campaigns(
        fake: FakeControl, monkeypatch: Any) -> None:
    """After an operator's rollback to v11, v12 is retained above it: a fresh console's
    Snapshots tab (cursor on v12) offers v10, never a roll forward, and the dialog names the
    campaigns the rollback removes, adds back and reverts."""
    from tests.fake_control import DIFF, SNAPSHOTS

    rows = [dict(s, active=s["version"] == 11, state="active" if s["version"] == 11 else
                 "retained") for s in cast(list[dict[str, Any]], SNAPSHOTS["snapshots"])]
    monkeypatch.setitem(SNAPSHOTS, "active", 11)
    monkeypatch.setitem(SNAPSHOTS, "snapshots", rows)
    for key, value in (("from", 10), ("to", 11), ("added", ["camp-9"]),
                       ("removed", ["camp-3", "camp-4"]), ("changed", ["camp-1"])):
        monkeypatch.setitem(DIFF, key, value)
    app = console(fake)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("2")
        assert cells(app, "snapshots-table")[0][0] == "v12"  # where the cursor starts
        await pilot.press("r")
        await until(pilot, "the confirmation", lambda: isinstance(app.screen, ConfirmScreen))
        assert isinstance(app.screen, ConfirmScreen)
        what = app.screen.what
        assert "Roll back from v11 to v10" in what and app.screen.typed == "10"
        assert "Removes: camp-9" in what and "Adds back: camp-3, camp-4" in what
        assert "Reverts: camp-1" in what
        await pilot.press("escape")

    run(app, scenario)


def test_logs_follow_unless_moved_up_and_tables_sort(fake: FakeControl,
                                                      monkeypatch: Any) -> None:
    from tests.fake_control import LOGS

    app = console(fake, refresh=0.25)

    def line(n: int) -> dict[str, Any]:
        return {"time": NOW + n, "level": "info", "component": "sync", "message": f"new {n}"}

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("5")
        table = app.query_one("#logs-table", DataTable)
        monkeypatch.setattr("tests.fake_control.LOGS", [*LOGS, line(1)])
        await until(pilot, "the new line", lambda: table.row_count == 6)
        assert table.cursor_row == 5, "at the newest line, a new one is followed"
        await pilot.press("up")
        monkeypatch.setattr("tests.fake_control.LOGS", [*LOGS, line(1), line(2)])
        await until(pilot, "another line", lambda: table.row_count == 7)
        assert table.cursor_row == 4, "moved up: the view stays where the operator is"
        # Sorting: a key per column (shown in help), again to reverse.
        await pilot.press("2")
        await pilot.press("number_sign")  # column 3: campaigns
        assert [row[2] for row in cells(app, "snapshots-table")] == [
            "100,009", "100,010", "100,011", "100,012"]
        await pilot.press("number_sign")
        assert cells(app, "snapshots-table")[0][2] == "100,012"
        await pilot.press("question_mark")
        helper = app.screen.query_one("#help-table", DataTable)
        help_rows = [[str(c) for c in helper.get_row_at(i)] for i in range(helper.row_count)]
        sort_row = next(r for r in help_rows if r[1] == "Sort by column 3")
        assert sort_row[0] == "#"
        assert any(r[0] == "q / ctrl+c" for r in help_rows)

    run(app, scenario)


def test_refused_before_confirmation_and_drain_is_amber(fake: FakeControl,
                                                         monkeypatch: Any) -> None:
    from tests.fake_control import STATUS, XDP

    monkeypatch.setitem(XDP, "loaded", False)
    monkeypatch.setitem(XDP, "reason", "not loaded; `adpop xdp attach` loads it")
    monkeypatch.setitem(STATUS, "tuning", {"enabled": False, "reason": "dev mode"})
    monkeypatch.setitem(STATUS, "components", {**STATUS["components"], "engine": {
        **STATUS["components"]["engine"], "draining": True, "reason": "draining"}})
    app = console(fake)

    async def scenario(pilot: Pilot[None]) -> None:
        assert app.query_one("#tile-engine", Static).has_class("warn")
        assert not app.query_one("#tile-engine", Static).has_class("bad")
        for key in ("b", "a", "k"):
            await pilot.press(key)
            await pilot.pause()
            assert not isinstance(app.screen, (ConfirmScreen, PromptScreen)), key
        assert not fake.writes
        monkeypatch.setitem(XDP, "loaded", True)
        await until(pilot, "a round with the filter", lambda: app.latest is not None and
                    app.latest.xdp.get("loaded") is True)
        await pilot.press("b", *"198.18.0.300/24", "enter")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen), "an invalid CIDR is refused first"
        assert not fake.writes

    run(console_refreshing(app), scenario)


def console_refreshing(app: ConsoleApp) -> ConsoleApp:
    app.refresh_s = 0.25
    return app


def test_stale_data_greys_out_and_the_banner_holds_the_whole_error(fake: FakeControl) -> None:
    app = console(fake, refresh=0.25)

    async def scenario(pilot: Pilot[None]) -> None:
        tile = app.query_one("#tile-engine", Static)
        assert not tile.has_class("stale")
        fake.stop()
        await until(pilot, "stale", lambda: tile.has_class("stale"), timeout=10)
        assert str(tile.border_subtitle).startswith("updated ") and \
            str(tile.border_subtitle).endswith(" s ago")
        assert all(g.has_class("stale") for g in app.query(".graph"))
        banner = app.query_one("#banner", Static)
        assert "DISCONNECTED" in text(app, "#banner")
        assert banner.size.height >= 2, "the whole message shows, wrapped"
        fake.start()
        await until(pilot, "fresh again", lambda: not tile.has_class("stale"), timeout=10)
        assert not tile.border_subtitle

    run(app, scenario)


def test_adpop_status_has_a_sync_line_and_says_when_it_is_stale(fake: FakeControl,
                                                                 monkeypatch: Any) -> None:
    """`adpop status` keeps the console's rule: figures older than two health rounds say
    so first (and the exit code is 1), and sync has its own line."""
    import subprocess
    import sys
    import time as clock

    from tests.fake_control import STATUS

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", "status", "--socket",
                               str(fake.path)], capture_output=True, text=True, timeout=60,
                              check=False)

    monkeypatch.setitem(STATUS, "health_interval", 1.0)
    monkeypatch.setitem(STATUS, "checked_at", clock.time())
    fresh = status()
    assert fresh.returncode == 0, fresh.stderr
    assert "STALE" not in fresh.stdout and "  sync     ok   v12 active" in fresh.stdout
    monkeypatch.setitem(STATUS, "checked_at", clock.time() - 45)
    stale = status()
    assert stale.returncode == 1
    assert stale.stdout.startswith("STALE: the supervisor's last health round was 4")


def test_ctrl_c_quits(fake: FakeControl) -> None:
    app = console(fake)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_code == 0 and not app.is_running

    run(app, scenario)


def test_every_action_has_a_key_and_every_key_one_action() -> None:
    check(KEYS)
    with pytest.raises(KeyMapError, match="'s' is bound to both 'pause' and 'sync_now'"):
        check({**KEYS, "pause": ("s",)})
    with pytest.raises(KeyMapError, match="'drain' has no key"):
        check({name: keys for name, keys in KEYS.items() if name != "drain"})
