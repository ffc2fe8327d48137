"""Operators run the origin from anywhere (issue 22, step 3): `adpop origin … --origin URL`
with a token from a 0600 file or $ADPOP_TOKEN, against a real `adpop origin serve` over TLS.
The first admin token is made on the origin host (bootstrap); every write is in the audit
log with the operator's name and its outcome."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.up import SAMPLE_CAMPAIGNS, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ADPOP = [sys.executable, "-m", "appliance.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ADPOP, *args], capture_output=True, text=True, cwd=REPO,
                          check=False, env={**os.environ, **(env or {})})


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    done = run(*args, env=env)
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


class Origin:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.conf = tmp / "origin.toml"
        self.conf.write_text(f'[origin]\nlisten = "127.0.0.1:{self.port}"\n'
                             f'state_dir = "{tmp / "origin"}"\n')
        ok("origin", "keys", "init", "--config", str(self.conf))

    def token(self, name: str, role: str) -> Path:
        """Made on the origin host, as the first admin's must be."""
        path = self.tmp / f"{name}.token"
        ok("origin", "tokens", "create", name, "--role", role, "--out", str(path), "--config",
           str(self.conf))
        return path


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    o = Origin(tmp_path)
    log = open(tmp_path / "origin.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([*ADPOP, "origin", "serve", "--config", str(o.conf)], cwd=REPO,
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{o.url}/v1/ca", timeout=1,
                                   context=ssl._create_unverified_context())
            break
        except OSError:
            assert time.monotonic() < deadline, (tmp_path / "origin.log").read_text()
            time.sleep(0.1)
    try:
        yield o
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_operator_runs_the_origin_remotely_and_every_write_is_audited(
        origin: Origin, tmp_path: Path) -> None:
    admin = origin.token("alice", "admin")
    assert admin.stat().st_mode & 0o777 == 0o600
    remote = ["--origin", origin.url, "--token-file", str(admin)]
    # From here on nothing reads the origin's files: another host could run these.
    out = ok("origin", "campaigns", "import", str(SAMPLE_CAMPAIGNS), *remote)
    assert "the store now holds" in out
    first = ok("origin", "campaigns", "list", *remote).splitlines()[1].split()[0]
    ok("origin", "campaigns", "pause", first, *remote)
    assert "paused" in ok("origin", "campaigns", "list", *remote)
    assert ok("origin", "publish", *remote).startswith("published v1:")
    assert "v1: stage halted (halted by alice)" in ok("origin", "rollout", "halt", "1", *remote)
    assert "v1: stage all" in ok("origin", "rollout", "release", "1", *remote)
    token = ok("origin", "pops", "enroll", "pop-9", "--group", "eu", *remote).strip()
    assert token.startswith("adpop-enroll-")
    assert "pop-9" in ok("origin", "pops", "list", *remote)
    # A read token from the admin, given through the environment.
    read_token = ok("origin", "tokens", "create", "bob", "--role", "read", *remote).strip()
    env = {"ADPOP_ORIGIN": origin.url, "ADPOP_TOKEN": read_token}
    assert "version" in ok("origin", "rollout", "status", env=env)
    ok("origin", "fleet", "--json", env=env)
    refused = run("origin", "publish", env=env)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1
    assert "operator bob has role read; publish needs publish" in refused.stderr
    ok("origin", "tokens", "revoke", "bob", *remote)
    gone = run("origin", "fleet", env=env)
    assert gone.returncode != 0 and "unknown or revoked operator token" in gone.stderr

    audit = ok("origin", "audit", *remote)
    for who, action in (("alice", "campaigns.import"), ("alice", "campaigns.pause"),
                        ("alice", "publish"), ("alice", "rollout.halt"),
                        ("alice", "pops.enroll"), ("alice", "tokens.create"),
                        ("bob", "publish"), ("alice", "tokens.revoke")):
        assert any(who in line and action in line for line in audit.splitlines()), \
            (who, action, audit)
    assert "refused: operator bob has role read" in audit
    assert token not in audit and read_token not in audit, "a token reached the audit log"
    # The bootstrap form: the origin host's own database, recorded as local:USER.
    ok("origin", "rollout", "halt", "1", "--config", str(origin.conf))
    assert "local:" in ok("origin", "audit", *remote)


def test_operator_tokens_are_refused_before_they_are_sent_anywhere_wrong(
        origin: Origin, tmp_path: Path) -> None:
    admin = origin.token("alice", "admin")
    admin.chmod(0o644)
    loose = run("origin", "fleet", "--origin", origin.url, "--token-file", str(admin))
    assert loose.returncode != 0 and "is readable by others" in loose.stderr
    admin.chmod(0o600)
    # Over plain HTTP to another host: refused here, the token stays home.
    plain = run("origin", "fleet", "--origin", "http://198.18.0.1:8700", "--token-file",
                str(admin))
    assert plain.returncode != 0 and "refusing to send an operator token over plain HTTP" \
        in plain.stderr
    # A token pinning another CA: the origin's CA does not match, nothing is sent.
    secret = admin.read_text().strip().partition(".")[0]
    wrong = tmp_path / "wrong.token"
    wrong.write_text(f"{secret}.{'00' * 32}\n")
    wrong.chmod(0o600)
    mismatch = run("origin", "fleet", "--origin", origin.url, "--token-file", str(wrong))
    assert mismatch.returncode != 0 and "is not the one the token names" in mismatch.stderr
    assert "GET /v1/fleet" not in (tmp_path / "origin.log").read_text()
    no_token = run("origin", "fleet", "--origin", origin.url,
                   env={"ADPOP_TOKEN": "", "ADPOP_ORIGIN": ""})
    assert no_token.returncode != 0 and "--origin needs an operator token" in no_token.stderr
    # An operator name that cannot be one, and a second token for a live name.
    bad = run("origin", "tokens", "create", "Bad Name!", "--config", str(origin.conf))
    assert bad.returncode != 0 and "operator name 'Bad Name!' is not usable" in bad.stderr
    again = run("origin", "tokens", "create", "alice", "--config", str(origin.conf))
    assert again.returncode != 0 and "revoke it first" in again.stderr
