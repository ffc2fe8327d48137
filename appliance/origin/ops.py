"""What operators do to the origin: one table of actions, served by the API and run by the CLI.

Each action has a route, the least role that may run it, and a function from the request's
parameters and JSON body to a JSON answer. The origin's API serves them behind operator
tokens (`Authorization: Bearer adpop-op-…`); `adpop origin … --origin URL` calls the API;
`adpop origin …` on the origin host runs the same function on the database directly (the
bootstrap: the first admin token is made there). Every write is recorded in the audit
table with the operator's name and its outcome, refusals included.

Roles, each with everything the ones before it may do:
- read     the fleet, rollouts, campaigns, enrolled PoPs
- publish  campaign import, pause and resume, publish, rollout halt/resume/release
- admin    PoP enrollment and revocation, operator tokens, the audit log

Tokens are 32 random bytes; only their SHA-256 is stored. After a dot a token carries the
SHA-256 of the origin's CA certificate, so the CLI trusts the origin it was made for.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from appliance.config import OriginConfig, identifier_fix, parse_duration
from appliance.errors import AdpopError
from appliance.origin import enroll, rollout
from appliance.origin.ca import Authority, split
from appliance.origin.db import OriginDB

if TYPE_CHECKING:  # the event store needs the origin's extra: imported when used
    from appliance.origin.events import EventStore

TOKEN_PREFIX = "adpop-op-"
Json = dict[str, Any]


class Role(IntEnum):
    READ = 1
    PUBLISH = 2
    ADMIN = 3

    @classmethod
    def named(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise OpsError(f"no role {name!r}", hint="use read, publish or admin") from None


class OpsError(AdpopError):
    """An operator's request that cannot be done as asked (status: the HTTP answer)."""

    status = 400


class Refused(OpsError):
    """No token, an unknown or revoked one (401), or one whose role is too low (403)."""

    def __init__(self, status: int, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class Context:
    db: OriginDB
    origin: OriginConfig
    authority: Authority | None
    events: EventStore | None = None  # the running origin's; None: opened read-only here
    pacing: Any = None  # the running origin's PacingService; None: no allowances known here


Run = Callable[[Context, Mapping[str, str], Json], Json]


@dataclass(frozen=True)
class Op:
    name: str  # also the audit log's action
    method: str
    path: str  # aiohttp's route syntax: {name} parts are the parameters
    role: Role
    run: Run

    @property
    def writes(self) -> bool:
        return self.method != "GET"

    def url(self, params: Mapping[str, str]) -> str:
        from urllib.parse import quote

        return self.path.format(**{k: quote(v, safe="") for k, v in params.items()})


def digest(token: str) -> str:
    return hashlib.sha256(split(token)[0].encode()).hexdigest()


def authenticate(db: OriginDB, header: str) -> tuple[str, Role]:
    """The operator an Authorization header names and its role; raises Refused (401)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX):
        raise Refused(401, "this route needs an operator token",
                      hint="send `Authorization: Bearer TOKEN`; an admin makes one with "
                           "`adpop origin tokens create NAME --role ROLE`")
    found = db.operator(digest(token.strip()))
    if found is None:
        raise Refused(401, "unknown or revoked operator token",
                      hint="ask an admin for a new one: `adpop origin tokens create NAME`")
    return found[0], Role.named(found[1])


def permit(op: Op, ctx: Context, operator: str, role: Role, params: Mapping[str, str]) -> None:
    """Raises Refused (403) when `role` may not run `op`; a refused write is recorded."""
    if role >= op.role:
        return
    message = (f"operator {operator} has role {role.name.lower()}; {op.name} needs "
               f"{op.role.name.lower()}")
    if op.writes:
        ctx.db.log_action(operator, op.name, ",".join(params.values()), f"refused: {message}")
    raise Refused(403, message, hint="ask an admin for a token with that role")


def _text(body: Json, key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise OpsError(f"{key!r} must be a string", hint=f'send {{"{key}": "..."}}')
    return value


# --- the actions --------------------------------------------------------------------------


def _fleet(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    return {"pops": [asdict(p) for p in ctx.db.pops()],
            "versions": [asdict(v) for v in ctx.db.versions()]}


def _campaigns(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    return {"campaigns": [asdict(c) for c in ctx.db.campaigns()]}


def _import(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    documents = body.get("documents")
    if not isinstance(documents, dict) or not all(isinstance(d, dict)
                                                  for d in documents.values()):
        raise OpsError("send the campaign documents as {\"documents\": {NAME: DOCUMENT}}",
                       hint="`adpop origin campaigns import DIR --origin URL` does")
    campaign_set = ctx.db.import_documents(sorted(documents.items()))
    return {"imported": len(documents), "campaigns": len(campaign_set.campaigns)}


def _pause(paused: bool) -> Run:
    def run(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
        ctx.db.set_paused(params["id"], paused)
        return {"campaign": params["id"], "paused": paused}

    return run


def _publish(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    from appliance.origin.publish import publish

    started = time.monotonic()
    done = publish(ctx.db, ctx.origin, allow_jump=bool(body.get("allow_jump", False)))
    return {**asdict(done), "seconds": round(time.monotonic() - started, 3)}


def _rollouts(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    pops = ctx.db.pops()
    return {"pops": len(pops), "versions": [
        {**asdict(v), "on": sum(1 for p in pops if p.version >= v.version)}
        for v in ctx.db.versions()]}


def _version(ctx: Context, params: Mapping[str, str]) -> int:
    text = params["version"]
    known = {v.version for v in ctx.db.versions()}
    if not text.isdigit() or int(text) not in known:
        raise OpsError(f"no published version {text[:20]!r}",
                       hint="`adpop origin rollout status` lists them")
    return int(text)


def _stage(stage: str, why: str) -> Run:
    def run(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
        version = _version(ctx, params)
        if stage == "first":
            target = rollout.first_stage(ctx.db.pops(), rollout.plan_from_config(ctx.origin))
        else:
            target = stage
        reason = f"{why} by {params['operator']}" if stage == "halted" else ""
        ctx.db.set_stage(version, target, reason)
        return {"version": version, "stage": target, "halted": reason}

    return run


def _identities(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    return {"pops": [{"pop": p, "group": g, "certificates": c, "tokens": t}
                     for p, g, c, t in ctx.db.identities()]}


def _enroll(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    if ctx.authority is None:
        raise OpsError("this origin has no CA to enroll PoPs with")
    ttl_text = _text(body, "ttl", "")
    try:
        ttl = parse_duration(ttl_text) if ttl_text else enroll.DEFAULT_TTL
    except ValueError as exc:
        raise OpsError(f"ttl {ttl_text!r}: {exc}", hint="give a duration such as 1h") from exc
    group = _text(body, "group", "default")
    made = enroll.token(ctx.db, params["name"], group, ttl, ctx.authority.fingerprint())
    return {"pop": params["name"], "group": group, "ttl": ttl, "token": made}


def _revoke(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    return {"pop": params["name"], "result": enroll.revoke(ctx.db, params["name"])}


def new_token(db: OriginDB, name: str, role: str, ca_fingerprint: str = "") -> str:
    """A new operator token for `name` with `role` (only its digest is stored)."""
    fix = identifier_fix(name)
    if fix:
        raise OpsError(f"operator name {name[:64]!r} is not usable", hint=fix)
    Role.named(role)
    made = TOKEN_PREFIX + secrets.token_urlsafe(32)
    db.add_operator(name, role.lower(), digest(made))
    return f"{made}.{ca_fingerprint}" if ca_fingerprint else made


def _token_create(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    pin = ctx.authority.fingerprint() if ctx.authority is not None else ""
    role = _text(body, "role", "read")
    return {"operator": params["name"], "role": role,
            "token": new_token(ctx.db, params["name"], role, pin)}


def _token_revoke(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    if not ctx.db.revoke_operator(params["name"]):
        raise OpsError(f"no live token of operator {params['name'][:64]!r}",
                       hint="`adpop origin tokens list` shows them")
    return {"operator": params["name"], "revoked": True}


def _tokens(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    return {"operators": [{"name": n, "role": r, "created": c, "revoked": v}
                          for n, r, c, v in ctx.db.operators()]}


def _audit(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    return {"actions": [{"at": a, "operator": o, "action": c, "target": t, "outcome": r}
                        for a, o, c, t, r in ctx.db.audit()]}


def _on_events(ctx: Context, read: Callable[[Any], Json]) -> Json:
    """`read` on a cursor of the event store: the running origin's, or this host's file
    opened read-only (which fails, saying so, while an origin holds it)."""
    from appliance.origin.events import open_store

    store = ctx.events or open_store(ctx.db.state_dir, read_only=True)
    try:
        with store.reader() as cursor:
            return read(cursor)
    finally:
        if ctx.events is None:
            store.close()


def _budgets(ctx: Context) -> Json:
    """Per budgeted campaign: budgets, today's stored spend, and (from the running origin)
    what its last round allowed the PoPs, their demand and what pacing held back."""
    from appliance.origin import pacing

    now = time.time()
    day = int(now) // 86400

    def read(cursor: Any) -> Json:
        spent: dict[str, int] = {}
        for (_, campaign), micros in pacing.spend_today(cursor, day).items():
            spent[campaign] = spent.get(campaign, 0) + micros
        before = pacing.spend_before(cursor, day)
        budgets = pacing.budgets_of([c for c in ctx.db.campaign_set().campaigns if not c.paused],
                                    (), before, now)
        given = {row["campaign"]: row for row in
                 (ctx.pacing.status()["campaigns"] if ctx.pacing is not None else [])}
        rows = []
        for b in budgets:
            live = given.get(b.campaign, {})
            rows.append({"key": b.campaign, "pacing": b.pacing.value,
                         "budget_daily": b.daily_micros / 1e6,
                         "budget_total": b.total_micros / 1e6,
                         "today_cap": b.day_cap() / 1e6,
                         "spent_today": spent.get(b.campaign, 0) / 1e6,
                         "allowed": live["allowed_micros"] / 1e6 if live else None,
                         "pops": live.get("pops"), "eligible_per_s": live.get("eligible_per_s"),
                         "throttled": live.get("throttled")})
        return {"by": "budget", "since": "", "until": "", "rows": rows}

    return _on_events(ctx, read)


def _report(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    from appliance.origin import reports

    by = _text(body, "by", "campaign")
    if by == "budget":
        return _budgets(ctx)
    since, until = _text(body, "since", ""), _text(body, "until", "")
    return _on_events(ctx, lambda cursor: {
        "by": by, "since": since, "until": until,
        "rows": reports.report(cursor, by, since, until)})


def _export(ctx: Context, params: Mapping[str, str], body: Json) -> Json:
    from appliance.origin import reports

    since, until = _text(body, "since", ""), _text(body, "until", "")
    return _on_events(ctx, lambda cursor: {
        "format": "parquet",
        "data": reports.encode(reports.export_parquet(cursor, since, until))})


OPS: tuple[Op, ...] = (
    Op("fleet", "GET", "/v1/fleet", Role.READ, _fleet),
    Op("campaigns.list", "GET", "/v1/ops/campaigns", Role.READ, _campaigns),
    Op("campaigns.import", "POST", "/v1/ops/campaigns", Role.PUBLISH, _import),
    Op("campaigns.pause", "POST", "/v1/ops/campaigns/{id}/pause", Role.PUBLISH, _pause(True)),
    Op("campaigns.resume", "POST", "/v1/ops/campaigns/{id}/resume", Role.PUBLISH,
       _pause(False)),
    Op("publish", "POST", "/v1/ops/publish", Role.PUBLISH, _publish),
    Op("rollout.status", "GET", "/v1/ops/rollout", Role.READ, _rollouts),
    Op("rollout.halt", "POST", "/v1/ops/rollout/{version}/halt", Role.PUBLISH,
       _stage("halted", "halted")),
    Op("rollout.resume", "POST", "/v1/ops/rollout/{version}/resume", Role.PUBLISH,
       _stage("first", "")),
    Op("rollout.release", "POST", "/v1/ops/rollout/{version}/release", Role.PUBLISH,
       _stage("all", "")),
    Op("pops.list", "GET", "/v1/ops/pops", Role.READ, _identities),
    Op("pops.enroll", "POST", "/v1/ops/pops/{name}/enroll", Role.ADMIN, _enroll),
    Op("pops.revoke", "POST", "/v1/ops/pops/{name}/revoke", Role.ADMIN, _revoke),
    Op("tokens.list", "GET", "/v1/ops/tokens", Role.ADMIN, _tokens),
    Op("tokens.create", "POST", "/v1/ops/tokens/{name}", Role.ADMIN, _token_create),
    Op("tokens.revoke", "POST", "/v1/ops/tokens/{name}/revoke", Role.ADMIN, _token_revoke),
    Op("audit", "GET", "/v1/ops/audit", Role.ADMIN, _audit),
    Op("report", "GET", "/v1/reports", Role.READ, _report),
    Op("events.export", "GET", "/v1/ops/events/export", Role.READ, _export),
)
BY_NAME = {op.name: op for op in OPS}


def run(op: Op, ctx: Context, operator: str, params: Mapping[str, str], body: Json) -> Json:
    """Runs `op` as `operator`; a write is recorded with its outcome, whatever it is.
    Raises OpsError (or another AdpopError the action raised)."""
    target = ",".join(params.values())
    try:
        answer = op.run(ctx, {**params, "operator": operator}, body)
    except AdpopError as exc:
        if op.writes:
            ctx.db.log_action(operator, op.name, target, f"refused: {exc.message}")
        raise
    if op.writes:
        # Secrets an action returns (tokens) are never written to the log.
        shown = {k: v for k, v in answer.items() if k != "token"}
        ctx.db.log_action(operator, op.name, target, f"ok: {shown}")
    return answer
