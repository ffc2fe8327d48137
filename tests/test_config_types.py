"""Settings are typed: mypy --strict rejects a misspelt one, and no signature that carries
configuration falls back to Any."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent

READER = '''
from appliance import config as cfg


def keep(appliance: cfg.ApplianceConfig) -> int:
    return appliance.snapshot.{key}


def window(sync: cfg.SyncSettings) -> int:
    return sync.{window}
'''


def mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "reader.py"
    path.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         str(path)], cwd=REPO, capture_output=True, text=True, check=False)


def test_mypy_rejects_a_misspelt_setting(tmp_path: Path) -> None:
    good = mypy(tmp_path, READER.format(key="keep_versions", window="health_window"))
    assert good.returncode == 0, good.stdout
    bad = mypy(tmp_path, READER.format(key="keep_version", window="health_windw"))
    assert bad.returncode == 1, bad.stdout
    assert '"SnapshotSettings" has no attribute "keep_version"' in bad.stdout
    assert '"SyncSettings" has no attribute "health_windw"' in bad.stdout


# Names the code gives to a whole configuration or one of its sections.
CONFIG_NAMES = {"appliance", "origin", "config", "cfg", "settings", "sync", "snapshot", "pop",
                "engine", "cache", "tuning", "xdp", "supervisor", "rollout"}


def test_no_configuration_is_typed_any() -> None:
    found = []
    for path in sorted([*(REPO / "appliance").rglob("*.py"), *(REPO / "tui").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.arg in CONFIG_NAMES and node.annotation:
                annotation = ast.unparse(node.annotation)
                if "Any" in annotation or annotation == "object":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.arg}: "
                                 f"{annotation}")
    assert found == []
