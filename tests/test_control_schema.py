"""One schema for the control API: every route of the real supervisor answers what
appliance/supervisor/schema.py says, and the console tests' fake serves the same routes with
answers of the same types, so the two cannot drift apart silently."""

from __future__ import annotations

import pytest

from appliance.supervisor import schema
from appliance.supervisor.client import _UnixConnection
from appliance.supervisor.control import ROUTES
from tests.fake_control import FakeControl
from tests.up_harness import Up

pytestmark = pytest.mark.integration

# What each write is sent: harmless on a running PoP (or refused with an Error).
BODIES = {"/v1/rollback": b'{"to": 999}', "/v1/xdp/block": b'{"cidrs": ["198.18.0.0/15"]}',
          "/v1/xdp/unblock": b'{"cidrs": ["198.18.0.0/15"]}'}
QUERIES = {"/v1/snapshots/diff": "?version=1", "/v1/logs": "?lines=20"}


def ask(socket: str, method: str, path: str) -> tuple[int, object]:
    import json

    conn = _UnixConnection(socket)
    try:
        body = BODIES.get(path, b"{}" if method == "POST" else None)
        conn.request(method, path + QUERIES.get(path, ""), body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def check_every_route(socket: str) -> dict[str, int]:
    statuses = {}
    for method, path, _ in ROUTES:
        status, answer = ask(socket, method, path)
        kind = schema.ANSWERS[(method, path)] if status < 300 else schema.Error
        problems = schema.conforms(answer, kind)
        assert not problems, f"{method} {path} (HTTP {status}): {problems}"
        statuses[f"{method} {path}"] = status
    return statuses


def test_every_route_is_typed_once() -> None:
    assert {(m, p) for m, p, _ in ROUTES} == set(schema.ANSWERS)


def test_the_real_supervisor_answers_every_route_as_typed(up: Up) -> None:
    up.adpop("origin", "publish", "--config", str(up.state / "origin.toml"))
    statuses = check_every_route(up.control)
    # Most routes answer 2xx here; the ones a dev-mode PoP refuses answer a typed Error.
    assert statuses["GET /v1/status"] == 200 and statuses["GET /v1/snapshots/diff"] == 200
    assert statuses["POST /v1/rollback"] == 409  # refused: no retained version 999
    assert statuses["POST /v1/tuning/apply"] == 409  # dev mode leaves tuning alone


def test_the_fake_serves_the_same_routes_with_the_same_types(fake: FakeControl) -> None:
    statuses = check_every_route(str(fake.path))
    assert set(statuses) == {f"{m} {p}" for m, p, _ in ROUTES}
    assert all(status == 200 for status in statuses.values()), statuses


def test_the_check_catches_drift() -> None:
    good = {"ok": True, "message": "done"}
    assert schema.conforms(good, schema.WriteResult) == []
    assert schema.conforms({"ok": "yes", "message": "done"}, schema.WriteResult) == [
        "$.ok: expected bool, got 'yes'"]
    assert schema.conforms({"ok": True}, schema.WriteResult) == ["$.message: missing"]
    assert schema.conforms({**good, "extra": 1}, schema.WriteResult) == [
        "$.extra: not in WriteResult"]
