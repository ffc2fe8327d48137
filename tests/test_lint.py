"""ruff and mypy run as tests: the codebase stays clean or the suite fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_clean() -> None:
    result = subprocess.run([BIN / "ruff", "check", "."], cwd=REPO, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_sources_are_clang_formatted() -> None:
    """The engine's C++ follows engine/.clang-format (STYLE.md)."""
    sources = sorted(str(p) for folder in ("src", "tests", "fuzz", "bench")
                     for p in (REPO / "engine" / folder).glob("*.[ch]pp"))
    assert len(sources) > 10
    result = subprocess.run(["clang-format", "--dry-run", "--Werror",
                             f"--style=file:{REPO / 'engine' / '.clang-format'}", *sources],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_mypy_clean() -> None:
    result = subprocess.run([BIN / "mypy"], cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_declared_python_is_the_one_the_code_needs() -> None:
    """The code uses 3.11 (tomllib, asyncio.timeout, zip(strict=)): the package, ruff and
    mypy all say 3.11, and no fallback for older Pythons is left behind."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    assert project["tool"]["mypy"]["python_version"] == "3.11"
    assert not [d for d in project["project"]["dependencies"] if d.startswith("tomli")]
    # Our sources only: images/out holds a whole built tree (pip vendors tomli there).
    sources = [*(p for folder in ("appliance", "tui", "bench")
                 for p in (REPO / folder).rglob("*.py")), *(REPO / "images").glob("*.py")]
    assert not [p for p in sources if "import tomli as" in p.read_text()]
