"""The `adpop` commands end to end, as an operator runs them."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_CAMPAIGNS

pytestmark = pytest.mark.integration

ADPOP = Path(sys.executable).parent / "adpop"


def adpop(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(ADPOP), *args], capture_output=True, text=True, check=False)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_keys_generate_modes(tmp_path: Path) -> None:
    out = adpop("keys", "generate", "--out", str(tmp_path / "keys")).stdout
    key = next((tmp_path / "keys").glob("*.key"))
    pub = key.with_suffix(".pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert key.stem in out and len(key.stem) == 16


def test_synth_build_verify_inspect_install(tmp_path: Path) -> None:
    adpop("keys", "generate", "--out", str(tmp_path / "keys"))
    key = str(next((tmp_path / "keys").glob("*.key")))
    adpop("snapshot", "synth", "--campaigns", "500", "--seed", "4", "--out",
          str(tmp_path / "camps"))
    # Same seed, same files.
    adpop("snapshot", "synth", "--campaigns", "500", "--seed", "4", "--out",
          str(tmp_path / "again"))
    for path in (tmp_path / "camps").iterdir():
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes()
    built = adpop("snapshot", "build", "--campaigns", str(tmp_path / "camps"), "--version", "12",
                  "--key", key, "--out", str(tmp_path / "snap"), "--ttl", "2h")
    assert "snapshot v12" in built.stdout
    adpop("snapshot", "verify", "--trust", str(tmp_path / "keys"), str(tmp_path / "snap"))
    info = json.loads(adpop("snapshot", "inspect", str(tmp_path / "snap"), "--json").stdout)
    assert info["manifest"]["version"] == 12
    assert info["manifest"]["expires"] - info["manifest"]["created"] == 7200
    assert info["counts"]["campaigns"] + info["counts"]["paused_skipped"] == 500
    assert info["index"]["conjunctions"] > 0
    text = adpop("snapshot", "inspect", str(tmp_path / "snap")).stdout
    assert "version        12" in text

    conf = tmp_path / "appliance.toml"
    conf.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    trust = ["--trust", str(tmp_path / "keys")]
    adpop("snapshot", "install", "--config", str(conf), *trust, str(tmp_path / "snap"))
    assert (tmp_path / "state" / "current").resolve().name == "12"
    listing = adpop("snapshot", "list", "--config", str(conf)).stdout
    assert "high-water 12" in listing
    # The same version again is a replay: refused in one line, nothing changes.
    again = adpop("snapshot", "install", "--config", str(conf), *trust, str(tmp_path / "snap"),
                  ok=False)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert "not above the high-water mark 12" in again.stderr


def test_build_reports_campaign_problems_in_one_line(tmp_path: Path) -> None:
    adpop("keys", "generate", "--out", str(tmp_path / "keys"))
    key = str(next((tmp_path / "keys").glob("*.key")))
    camps = tmp_path / "camps"
    camps.mkdir()
    for path in SAMPLE_CAMPAIGNS.iterdir():
        (camps / path.name).write_text(path.read_text().replace("ecpm = 6.50", "ecpm = -1"))
    result = adpop("snapshot", "build", "--campaigns", str(camps), "--version", "1", "--key",
                   key, "--out", str(tmp_path / "snap"), ok=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"adpop: error: {camps / 'campaigns.toml'}: campaign "
                                    "contoso-savings: ecpm:")
    assert not (tmp_path / "snap").exists()


def test_missing_key_is_one_line(tmp_path: Path) -> None:
    result = adpop("snapshot", "build", "--campaigns", str(SAMPLE_CAMPAIGNS), "--version", "1",
                   "--key", str(tmp_path / "nope.key"), "--out", str(tmp_path / "s"), ok=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "cannot read signing key" in result.stderr and "adpop keys generate" in result.stderr


def test_bad_flag_exits_2() -> None:
    result = adpop("snapshot", "build", "--bogus", ok=False)
    assert result.returncode == 2


def test_builds_are_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SOURCE_DATE_EPOCH or --created fixes the one wall-clock input: two builds of the same
    campaigns and version, seconds apart, are then byte-identical."""
    adpop("keys", "generate", "--out", str(tmp_path / "keys"))
    key = str(next((tmp_path / "keys").glob("*.key")))

    def build(out: str, *extra: str) -> bytes:
        adpop("snapshot", "build", "--campaigns", str(SAMPLE_CAMPAIGNS), "--version", "3",
              "--key", key, "--out", str(tmp_path / out), *extra)
        return b"".join((tmp_path / out / name).read_bytes()
                        for name in ("manifest.json", "payload.capnp"))

    plain = build("plain")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1790000000")
    first = build("first")
    time.sleep(1.1)  # a second later: the clock would show
    assert build("second") == first
    assert plain != first, "without it the build carries the wall clock"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert build("flag", "--created", "2026-09-21T14:13:20Z") == first  # the same instant
    bad = adpop("snapshot", "build", "--campaigns", str(SAMPLE_CAMPAIGNS), "--version", "3",
                "--key", key, "--out", str(tmp_path / "bad"), "--created", "soon", ok=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--created 'soon' is not a time" in bad.stderr


def test_console_without_a_terminal_is_one_line(tmp_path: Path) -> None:
    """It used to spin at 91% CPU for minutes; now it refuses at once."""
    result = subprocess.run([str(ADPOP), "console", "--socket", str(tmp_path / "none.sock")],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "adpop console needs a terminal" in result.stderr


def test_flash_lists_disks_without_an_image_and_marks_the_root_disk() -> None:
    import pyudev

    from appliance.flash import _root_disk

    root = _root_disk(pyudev.Context())
    result = adpop("flash")
    assert "candidate disks:" in result.stdout and "then: adpop flash IMAGE --device DEV" in \
        result.stdout
    if root is not None:  # a root file system on a real disk (not an overlay): marked
        line = next(x for x in result.stdout.splitlines() if x.strip().startswith(root + " "))
        assert line.endswith("REFUSED: holds the running system's root file system"), line
    listed = json.loads(adpop("flash", "--json").stdout)
    assert all(set(d) >= {"path", "refused"} for d in listed)
    bad = adpop("flash", "--device", "/dev/nosuch", ok=False)
    assert bad.returncode == 2 and "--device given without an image" in bad.stderr


def test_flash_site_config_is_edited_as_toml_and_takes_only_a_tuf_root(tmp_path: Path) -> None:
    from appliance.flash import ROOT_NAME, FlashError, site_config
    from appliance.origin.tuf_repo import Repository

    repo = Repository.open(tmp_path / "tuf")
    root = repo.metadata / "root.json"
    site = tmp_path / "site.toml"
    site.write_text(f'# the Frankfurt PoP\n[pop]\nid = "pop-fra-1"  # its name\n\n'
                    f'[snapshot]\ntrust_root = "{root}"  # the origin\'s\n'
                    'keep_versions = 4\n\n[sync]\norigin_url = "https://origin.example"\n')
    config = site_config(site)
    assert config.keys == {ROOT_NAME: root.read_bytes()}
    assert "trust_root" not in config.text
    for kept in ("# the Frankfurt PoP", 'id = "pop-fra-1"  # its name', "keep_versions = 4",
                 'origin_url = "https://origin.example"'):
        assert kept in config.text
    import tomllib

    assert tomllib.loads(config.text)["snapshot"] == {"keep_versions": 4}

    targets = repo.metadata / "1.targets.json"
    unsigned = json.loads(root.read_text())
    unsigned["signatures"] = []
    (tmp_path / "unsigned.json").write_text(json.dumps(unsigned))
    for path, problem in ((tmp_path / "missing.json", "does not exist"),
                          (targets, "is TUF targets metadata, not a root"),
                          (tmp_path / "unsigned.json", "not signed by a threshold of its keys"),
                          (site, "is not TUF root metadata")):
        site.write_text(f'[snapshot]\ntrust_root = "{path}"\n')
        with pytest.raises(FlashError, match=problem):
            site_config(site)


def test_version_and_tune_as_a_user_are_one_line() -> None:
    version = adpop("--version")
    assert version.stdout.strip() == "adpop 0.1.0"
    for action in ("apply", "rollback"):
        result = subprocess.run(["runuser", "-u", "nobody", "--", str(ADPOP), "tune", action],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"adpop tune {action} writes kernel settings" in result.stderr


def test_read_only_commands_create_no_state(tmp_path: Path) -> None:
    """Without --config they read the defaults' /var/lib paths: when those are missing they
    say so in one line and make nothing (here in a private mount namespace with an empty
    tmpfs over /var/lib, so the host's is not touched)."""
    script = "; ".join(f'"{ADPOP}" {args} 2>&1; echo "rc=$?"' for args in (
        "origin fleet", "origin rollout status", "origin campaigns list", "snapshot list",
        "pop snapshots")) + "; find /var/lib -mindepth 1 | wc -l"
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs tmpfs /var/lib && {script}"],
                            capture_output=True, text=True, timeout=120, check=False)
    lines = result.stdout.splitlines()
    assert lines[-1].strip() == "0", "nothing was created under /var/lib"
    answers = [line for line in lines[:-1] if not line.startswith("rc=")]
    assert [line for line in lines if line.startswith("rc=")] == ["rc=2"] * 5, lines
    assert all("nothing was created" in a and a.startswith("adpop: error: no ") for a in answers)


def test_up_takes_the_ports_of_every_part(tmp_path: Path) -> None:
    import socket

    from appliance.up import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = adpop("up", "--state", str(tmp_path / "s"), "--port", str(free_port()),
                     "--cache-port", str(port), ok=False)
    assert busy.returncode == 2 and f"--cache-port {port}: the port on 127.0.0.1 is taken" in \
        busy.stderr
    same = free_port()
    clash = adpop("up", "--state", str(tmp_path / "s"), "--port", str(same),
                  "--origin-port", str(same), ok=False)
    assert clash.returncode == 2 and f"--port {same} is also --origin-port" in clash.stderr
    assert "--origin-port N" in adpop("up", "--help").stdout
    # The chosen ports are the ones the parts are configured with.
    from appliance.up import _write_configs

    chosen = {"origin": free_port(), "push": free_port(), "cache": free_port()}
    origin_toml, pop_toml, ports = _write_configs(tmp_path, free_port(), chosen)
    assert {k: ports[k] for k in chosen} == chosen
    assert f'listen = "127.0.0.1:{chosen["origin"]}"' in origin_toml.read_text()
    pop = pop_toml.read_text()
    assert f'push_listen = "127.0.0.1:{chosen["push"]}"' in pop
    assert f'address = "127.0.0.1:{chosen["cache"]}"' in pop


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path: Path) -> None:
    """`adpop status | head -1` and the like: the reader is gone (`true` reads nothing)
    before the first line is written."""
    for command in ("config dump", "xdp status --config config/appliance.toml", "--help"):
        result = subprocess.run(f"'{ADPOP}' {command} | true; "
                                "echo \"rc=${PIPESTATUS[0]}\"", shell=True,
                                executable="/bin/bash", capture_output=True, text=True,
                                timeout=60, check=False, cwd=Path(__file__).parent.parent)
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, \
            (command, result.stderr)
        assert result.stdout.strip() in ("rc=0", "rc=141", "rc=1"), (command, result.stdout)


def test_config_kinds_offered_are_the_scopes() -> None:
    """`--kind` spells the scopes out so that --help need not import the configuration."""
    from appliance import config as cfg
    from appliance.cli.settings import SCOPES

    assert tuple(s.value for s in cfg.Scope) == SCOPES
