"""Snapshot tests of every console screen at 120x40, against the fake control API's fixed
data and a fixed clock. Update on purpose with `pytest --snapshot-update`, then review the
SVGs under tests/__snapshots__/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from tests.fake_control import NOW, FakeControl
from tui.app import ConsoleApp

pytestmark = pytest.mark.unit

SIZE = (120, 40)


def loaded(*keys: str) -> Callable[[Pilot[None]], Any]:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, ConsoleApp)
        for _ in range(200):
            if app.latest is not None:
                break
            await pilot.pause(0.05)
        await pilot.press(*keys)
        await pilot.pause()
    return run_before


@pytest.mark.parametrize("keys", [(), ("2",), ("3",), ("4",), ("5",), ("question_mark",)],
                         ids=["overview", "snapshots", "tuning", "xdp", "logs", "help"])
def test_screen(snap_compare: Any, fake: FakeControl, keys: tuple[str, ...]) -> None:
    app = ConsoleApp(str(fake.path), clock=lambda: NOW, refresh=600.0, title="pop-fra-1")
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded(*keys))


def test_read_only_overview(snap_compare: Any, fake: FakeControl) -> None:
    app = ConsoleApp(str(fake.path), clock=lambda: NOW, refresh=600.0, title="pop-fra-1",
                     read_only=True)
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded())
