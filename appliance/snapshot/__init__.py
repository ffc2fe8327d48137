"""Campaign snapshots: model, compiler, signed manifest, verification and the versioned store."""

from __future__ import annotations
