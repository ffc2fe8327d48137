"""Campaign snapshots: model, compiler, signed manifest, verification and the versioned store."""

from __future__ import annotations

# The link to the active version, under the store's root (the state directory): named here,
# in a module that imports nothing, so the engine's command line can name it without loading
# the store.
CURRENT_LINK = "current"
