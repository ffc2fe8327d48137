"""The settings table drives parsing, drop-ins, dump and check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config as cfg

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
ADPOP = Path(sys.executable).parent / "adpop"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_come_from_the_table() -> None:
    config = cfg.load(cfg.Scope.APPLIANCE)
    for setting in cfg.settings_for(cfg.Scope.APPLIANCE):
        assert getattr(getattr(config, setting.section), setting.key) == setting.default


def test_config_is_frozen() -> None:
    config = cfg.load(cfg.Scope.APPLIANCE)
    with pytest.raises(AttributeError):
        config.snapshot.keep_versions = 3  # type: ignore[misc]  # the point: refused


def test_dropins_later_wins_and_lists_append(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml",
                 '[snapshot]\nkeep_versions = 3\nclock_skew = "1m"\n[xdp]\nnics = ["a0"]\n')
    write(tmp_path / "appliance.d" / "10-site.toml", '[snapshot]\nkeep_versions = 4\n')
    write(tmp_path / "appliance.d" / "20-keys.toml",
          '[snapshot]\nkeep_versions = 6\n[xdp]\nnics = ["b0"]\n')
    write(tmp_path / "appliance.d" / "README", "not toml, ignored")
    config = cfg.load(cfg.Scope.APPLIANCE, main)
    assert config.snapshot.keep_versions == 6
    assert config.xdp.nics == ["a0", "b0"]
    assert config.snapshot.clock_skew == 60
    assert config.pop.target_group == "default"


@pytest.mark.parametrize(("text", "key", "fix"), [
    ("[snapshot]\ntrust_rot = \"/r.json\"\n", "snapshot.trust_rot",
     "did you mean 'snapshot.trust_root'?"),
    ("[snapshto]\nkeep_versions = 2\n", "snapshto", "did you mean 'snapshot'?"),
    ("[snapshot]\nkeep_versions = 1\n", "snapshot.keep_versions", "at least 2"),
    ("[snapshot]\nkeep_versions = \"5\"\n", "snapshot.keep_versions", "whole number"),
    ("[snapshot]\nclock_skew = \"5 minutes\"\n", "snapshot.clock_skew", "duration"),
    ("[snapshot]\nmax_payload_bytes = \"2 GB\"\n", "snapshot.max_payload_bytes", "size"),
    ("[xdp]\nnics = \"eth0\"\n", "xdp.nics", "list"),
    ("[pop]\ntarget_group = \"Bad Name\"\n", "pop.target_group", "1-63 characters"),
    ("[pop]\nid = \n", "-", "TOML syntax"),
    ("pop = 3\n", "pop", "[pop] table"),
    ("[engine]\nlisten = \"::1:8080\"\n", "engine.listen", "IPv6 one in brackets"),
    ("[engine]\nlisten = \"127.0.0.1:8080,[::]\"\n", "engine.listen", "'[::]' is not HOST:PORT"),
    ("[engine]\nmetrics_listen = \"localhost:9180\"\n", "engine.metrics_listen",
     "use an IPv4 address"),
    # Issue 20, case 6: settings `config check` used to accept that broke the PoP.
    ("[sync]\npush_listen = \"nonsense\"\n", "sync.push_listen", "is not HOST:PORT"),
    ("[sync]\norigin_url = \"ftp:/nowhere\"\n", "sync.origin_url", "http:// or https://"),
    ("[sync]\norigin_url = \"http://origin:99999\"\n", "sync.origin_url", "http://"),
    ("[engine]\nlisten = \"not-an-address\"\n", "engine.listen", "is not HOST:PORT"),
    ("[engine]\nshards = 100000\n", "engine.shards", "from 1 to 1024"),
])
def test_check_names_file_key_and_fix(tmp_path: Path, text: str, key: str, fix: str) -> None:
    path = write(tmp_path / "appliance.toml", text)
    problems = cfg.check_files([path], cfg.Scope.APPLIANCE)
    assert len(problems) == 1
    line = problems[0].line()
    assert line.startswith(f"{path}: {key}: ")
    assert fix in line
    with pytest.raises(cfg.ConfigError):
        cfg.load(cfg.Scope.APPLIANCE, path)


def test_listen_takes_a_list_and_ipv6(tmp_path: Path) -> None:
    path = write(tmp_path / "appliance.toml",
                 '[engine]\nlisten = "[::]:8080, 127.0.0.1:8081"\nmetrics_listen = ""\n')
    assert cfg.check_files([path], cfg.Scope.APPLIANCE) == []
    assert cfg.listen_addresses(cfg.load(cfg.Scope.APPLIANCE, path).engine.listen) == [
        ("::", 8080), ("127.0.0.1", 8081)]


def test_check_lists_every_problem_one_line_each(tmp_path: Path) -> None:
    path = write(tmp_path / "appliance.toml",
                 "[snapshot]\nthreshold = 2\nkeep_versions = 0\n[pops]\nid = 'x'\n")
    result = subprocess.run([ADPOP, "config", "check", str(path)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith(str(path)) and "; fix: " in line for line in lines)


def test_check_covers_dropins(tmp_path: Path) -> None:
    path = write(tmp_path / "origin.toml", "[snapshot]\nttl = \"1d\"\n")
    bad = write(tmp_path / "origin.d" / "50-bad.toml", "[snapshot]\nttl = 5\n")
    result = subprocess.run([ADPOP, "config", "check", str(path)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2
    assert result.stdout.startswith(f"{bad}: snapshot.ttl: ")


def test_scope_follows_file_name(tmp_path: Path) -> None:
    origin = write(tmp_path / "origin.toml", "[snapshot]\nroot_keys = 5\n")
    assert cfg.check_files([origin], cfg.scope_of(origin)) == []
    problems = cfg.check_files([origin], cfg.Scope.APPLIANCE)
    assert problems and problems[0].key == "snapshot.root_keys"


def test_dump_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path / "appliance.toml",
                 '[snapshot]\nkeep_versions = 9\nclock_skew = 90\nmax_payload_bytes = "1GiB"\n')
    config = cfg.load(cfg.Scope.APPLIANCE, path)
    dumped = write(tmp_path / "again" / "appliance.toml", cfg.dump(config, cfg.Scope.APPLIANCE))
    assert cfg.load(cfg.Scope.APPLIANCE, dumped) == config
    result = subprocess.run([ADPOP, "config", "dump", "--config", str(path)],
                            capture_output=True, text=True, check=True)
    assert "keep_versions = 9" in result.stdout
    assert 'clock_skew = "90s"' in result.stdout


@pytest.mark.parametrize("scope", list(cfg.Scope))
def test_shipped_files_hold_every_setting_with_a_comment(scope: cfg.Scope) -> None:
    path = REPO / "config" / f"{scope.value}.toml"
    assert cfg.check_files([path], scope) == []
    lines = path.read_text().splitlines()
    section = ""
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key = line.split("=")[0].strip()
            assert lines[i - 1].startswith("# "), f"{section}.{key} has no comment"
            seen.add(f"{section}.{key}")
    assert seen == {s.name for s in cfg.settings_for(scope)}
    # Derived from the section classes, never edited apart from them.
    assert path.read_text() == cfg.dump(cfg.build(scope), scope), (
        f"config/{scope.value}.toml is stale; regenerate it with "
        f"`adpop config dump --kind {scope.value} > config/{scope.value}.toml`")


def test_duration_and_size_parsers() -> None:
    assert cfg.parse_duration("7d") == 7 * 86400
    assert cfg.parse_duration(45) == 45
    assert cfg.parse_size("64KiB") == 65536
    assert cfg.format_duration(3600) == "1h"
    assert cfg.format_size(3 * 1024**2) == "3MiB"
    with pytest.raises(cfg.ValueProblem):
        cfg.parse_duration("soon")
    with pytest.raises(cfg.ValueProblem):
        cfg.parse_size(True)


@pytest.mark.parametrize(("text", "key", "fix"), [
    ("[origin]\nlisten = \"127.0.0.1:99999\"\n", "origin.listen", "is not HOST:PORT"),
    ("[rollout]\npercent = 250\n", "rollout.percent", "from 1 to 100"),
])
def test_origin_settings_that_broke_the_origin_are_refused(tmp_path: Path, text: str, key: str,
                                                           fix: str) -> None:
    path = write(tmp_path / "origin.toml", text)
    problems = cfg.check_files([path], cfg.Scope.ORIGIN)
    assert len(problems) == 1 and problems[0].line().startswith(f"{path}: {key}: ")
    assert fix in problems[0].line()


def test_dev_mode_binaries_must_be_executables(tmp_path: Path) -> None:
    """Case 6: engine.binary pointing nowhere restarted forever without naming the path."""
    path = tmp_path / "appliance.toml"
    path.write_text('[supervisor]\nmode = "dev"\n'
                    '[engine]\nbinary = "/nowhere/adpop-engine"\n'
                    '[cache]\nbinary = "no-such-redis-server"\n')
    lines = [p.line() for p in cfg.check_files([path], cfg.Scope.APPLIANCE)]
    assert len(lines) == 2, lines
    assert "engine.binary: '/nowhere/adpop-engine' is not an executable file" in lines[0]
    assert "make setup" in lines[0]
    assert "cache.binary: 'no-such-redis-server'" in lines[1]
    with pytest.raises(cfg.ConfigError):
        cfg.load(cfg.Scope.APPLIANCE, path)
    # The appliance's units name their own binaries: the settings are not used there.
    path.write_text('[engine]\nbinary = "/nowhere/adpop-engine"\n')
    assert cfg.check_files([path], cfg.Scope.APPLIANCE) == []
    # A binary found on PATH is enough.
    path.write_text(f'[supervisor]\nmode = "dev"\n[engine]\nbinary = "{sys.executable}"\n'
                    '[cache]\nbinary = "sh"\n')
    assert cfg.check_files([path], cfg.Scope.APPLIANCE) == []


@pytest.mark.parametrize("text, key, fix", [
    ('[cache]\naddress = "localhost:6379"\n', "cache.address", "is not HOST:PORT"),
    ('[engine]\nunit = "adpop-engine"\n', "engine.unit", "systemd service name"),
    ('[cache]\nunit = "redis"\n', "cache.unit", "systemd service name"),
    ('[supervisor]\noperator_group = "Ops Team"\n', "supervisor.operator_group", "group name"),
    ('[tuning]\ngovernor = "turbo"\n', "tuning.governor", "write one of performance"),
])
def test_the_remaining_free_text_settings_are_checked(tmp_path: Path, text: str, key: str,
                                                      fix: str) -> None:
    """Case 6: every setting has a type that checks its values."""
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    (problem,) = cfg.check_files([path], cfg.Scope.APPLIANCE)
    assert problem.key == key and fix in problem.fix, problem.line()
