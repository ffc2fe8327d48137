"""Waiting inside an asyncio test: for a condition another task makes true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def until(what: str, check: Callable[[], Any], detail: Callable[[], Any] | None = None,
                timeout: float = 10.0) -> None:
    """Returns once check() is true; fails naming `what` (and detail()) after `timeout`."""
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}"
                         + (f"; {detail()}" if detail is not None else ""))
