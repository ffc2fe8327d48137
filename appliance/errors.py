"""The project's base error. Each module defines its own small subclasses."""

from __future__ import annotations


class AdpopError(Exception):
    """An error an operator can act on: one line of what went wrong, one hint of how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The one-line rendering used by the CLI."""
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message
