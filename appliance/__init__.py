"""adpop appliance: the Python side of the edge PoP (config, snapshots; later sync, supervisor)."""

from __future__ import annotations

__version__ = "0.1.0"
