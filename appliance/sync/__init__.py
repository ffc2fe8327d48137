"""The PoP side of snapshot distribution: fetch, check, activate, report."""
