"""adpop operator console (Textual). Built by the console issue; talks only to the control API."""

from __future__ import annotations
