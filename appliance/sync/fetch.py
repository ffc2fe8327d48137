"""Fetching from the origin with byte caps, a deadline and resume.

An origin that sends too much (endless data) is cut off at the cap; one that sends too slowly
(slow retrieval) is dropped at the deadline. A payload download interrupted part-way is
resumed with a Range request from the bytes already on disk.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp import ClientError, ClientSession

from appliance.snapshot.manifest import Reason, VerifyError


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise VerifyError(Reason.SLOW_RETRIEVAL, "the fetch deadline passed")
    return left


async def fetch_manifest(session: ClientSession, url: str, cap: int, deadline: float
                         ) -> bytes | None:
    """The manifest bytes, or None when the origin has none for this PoP (204)."""
    try:
        async with asyncio.timeout(_left(deadline)), session.get(url) as resp:
            if resp.status == 204:
                return None
            if resp.status != 200:
                raise VerifyError(Reason.UNREACHABLE, f"GET {url}: HTTP {resp.status}")
            data = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > cap:
                    raise VerifyError(Reason.TOO_LARGE,
                                      f"manifest passed {cap} bytes; the rest was not read")
            return bytes(data)
    except TimeoutError as exc:
        raise VerifyError(Reason.SLOW_RETRIEVAL, f"manifest not received in time from {url}"
                          ) from exc
    except ClientError as exc:
        raise VerifyError(Reason.UNREACHABLE, f"GET {url}: {exc}") from exc


async def fetch_payload(session: ClientSession, url: str, length: int, partial: Path,
                        deadline: float) -> None:
    """Exactly `length` bytes into `partial`, resumed from what it already holds."""
    have = partial.stat().st_size if partial.exists() else 0
    if have > length:
        partial.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if 0 < have < length else {}
    try:
        if have < length:
            async with asyncio.timeout(_left(deadline)), session.get(url, headers=headers
                                                                     ) as resp:
                if resp.status not in (200, 206):
                    raise VerifyError(Reason.UNREACHABLE, f"GET {url}: HTTP {resp.status}")
                mode = "ab" if resp.status == 206 else "wb"
                got = have if resp.status == 206 else 0
                with partial.open(mode) as out:
                    async for chunk in resp.content.iter_any():
                        got += len(chunk)
                        if got > length:
                            raise VerifyError(Reason.LENGTH_MISMATCH,
                                              f"payload passed the manifest's {length} bytes; "
                                              f"the rest was not read")
                        out.write(chunk)
                if got < length:
                    raise VerifyError(Reason.LENGTH_MISMATCH,
                                      f"payload ended at {got} of {length} bytes")
    except TimeoutError as exc:
        kept = partial.stat().st_size if partial.exists() else 0
        raise VerifyError(Reason.SLOW_RETRIEVAL, f"payload not received in time ({kept} of "
                          f"{length} bytes kept for resume)") from exc
    except ClientError as exc:
        raise VerifyError(Reason.UNREACHABLE, f"GET {url}: {exc}") from exc
