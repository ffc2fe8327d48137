"""Reports over the event store (issue 23, step 5): requests, decisions with ads, no-fill,
impressions, clicks, CTR, spend and fill rate, by campaign, advertiser, PoP, placement, hour
or day; and the events themselves as Parquet for other tools.

Decisions are per request: grouped by campaign, advertiser or placement (which a request as
a whole has none of), `with_ads` counts the ads served in the group and the per-request
columns are left empty. Spend is impressions at their served eCPM (per thousand).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import tempfile
from pathlib import Path
from typing import Any

from appliance.config import parse_duration
from appliance.errors import AdpopError

GROUPS = {
    "campaign": "campaign", "advertiser": "advertiser", "pop": "pop", "placement": "placement",
    "hour": "strftime(date_trunc('hour', time), '%Y-%m-%dT%H:00Z')",
    "day": "strftime(date_trunc('day', time), '%Y-%m-%d')",
}
PER_REQUEST = ("pop", "hour", "day")  # groups a whole request falls in
COLUMNS = ("key", "requests", "with_ads", "no_fill", "impressions", "clicks", "ctr", "spend",
           "fill_rate")


class ReportError(AdpopError):
    """A report asked for in a way that cannot be answered."""


def moment(text: str, now: dt.datetime) -> dt.datetime:
    """An ISO 8601 time (UTC when it names no zone), or a duration before `now` (24h, 7d)."""
    try:
        return now - dt.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"{text[:40]!r} is neither a time nor a duration",
                          hint="give 2026-12-01, 2026-12-01T10:00Z or a duration such as "
                               "24h") from None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def window(since: str, until: str) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    start = moment(since, now) if since else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    end = moment(until, now) if until else now + dt.timedelta(days=2)
    return start, end


def report(cursor: Any, by: str, since: str = "", until: str = "") -> list[dict[str, Any]]:
    key = GROUPS.get(by)
    if key is None:
        raise ReportError(f"cannot report by {by[:20]!r}", hint="by one of " +
                          ", ".join(GROUPS))
    start, end = window(since, until)
    per_request = by in PER_REQUEST
    with_ads = ("count(*) FILTER (WHERE type = 'decision' AND ads > 0)" if per_request
                else "count(*) FILTER (WHERE type = 'served')")
    rows = cursor.execute(
        f"SELECT {key} AS key, count(*) FILTER (WHERE type = 'decision'), {with_ads}, "
        "count(*) FILTER (WHERE type = 'decision' AND ads = 0), "
        "count(*) FILTER (WHERE type = 'impression'), count(*) FILTER (WHERE type = 'click'), "
        "coalesce(sum(price_micros) FILTER (WHERE type = 'impression'), 0) "
        "FROM events WHERE time >= ? AND time < ? "
        + ("" if per_request else "AND type <> 'decision' ")
        + "GROUP BY 1 ORDER BY 1",
        [start.replace(tzinfo=None), end.replace(tzinfo=None)]).fetchall()
    out = []
    for key_value, requests, ads, no_fill, impressions, clicks, price in rows:
        out.append({
            "key": key_value, "requests": requests if per_request else None,
            "with_ads": ads, "no_fill": no_fill if per_request else None,
            "impressions": impressions, "clicks": clicks,
            "ctr": round(clicks / impressions, 6) if impressions else None,
            # eCPM is per thousand impressions, in micros of the currency unit.
            "spend": round(int(price) / 1000 / 1e6, 6),
            "fill_rate": round(ads / requests, 6) if per_request and requests else None})
    return out


def export_parquet(cursor: Any, since: str = "", until: str = "") -> bytes:
    """The events in the window as one Parquet file (DuckDB writes it)."""
    start, end = window(since, until)
    fd, name = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    path = Path(name)
    try:
        cursor.execute(
            "COPY (SELECT * REPLACE (CAST(key AS VARCHAR) AS key) FROM events "
            "WHERE time >= ? AND time < ? ORDER BY time) TO '" + str(path).replace("'", "''")
            + "' (FORMAT parquet, COMPRESSION zstd)",
            [start.replace(tzinfo=None), end.replace(tzinfo=None)]).fetchall()
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode()
