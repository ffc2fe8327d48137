"""How the shipper's batches reach the origin: over HTTPS to POST /v1/events with this PoP's
certificate (the default), or into a NATS JetStream stream (events.transport = "nats")."""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from appliance.events.batch import BATCH_HEADER, POP_HEADER, Batch
from appliance.events.shipper import DeliveryError

SEND_TIMEOUT = 30.0
# Answers that mean "not now" rather than "never" (an identity an operator fixes, an older
# origin, overload): sent again after a backoff. Other 4xx refuse the batch itself.
RETRYABLE = {401, 403, 404, 408, 425, 429}


class HttpTransport:
    def __init__(self, origin_url: str, pop: str, tls: ssl.SSLContext | None) -> None:
        self.url = origin_url.rstrip("/") + "/v1/events"
        self.pop = pop
        self.tls = tls
        self.description = f"http {self.url}"
        self.session: ClientSession | None = None

    async def send(self, batch: Batch) -> None:
        if self.session is None:
            connector = TCPConnector(ssl=self.tls) if self.tls is not None else None
            self.session = ClientSession(timeout=ClientTimeout(total=SEND_TIMEOUT),
                                         connector=connector)
        headers = {BATCH_HEADER: batch.id, POP_HEADER: self.pop,
                   "Content-Type": "application/zstd"}
        try:
            async with self.session.post(self.url, data=batch.payload, headers=headers) as resp:
                if resp.status == 200:
                    await resp.read()
                    return
                try:
                    error = (await resp.json())["error"]
                    reason, message = str(error["code"]), str(error["message"])
                except (ClientError, ValueError, KeyError, TypeError):
                    reason, message = f"http-{resp.status}", f"HTTP {resp.status}"
        except (ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise DeliveryError(f"cannot reach the origin at {self.url}: "
                                f"{exc or type(exc).__name__}") from exc
        refused = 400 <= resp.status < 500 and resp.status not in RETRYABLE
        raise DeliveryError(f"the origin answered {resp.status}: {message}", refused, reason)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
            # aiohttp's advice: let the connector's transports finish closing.
            await asyncio.sleep(0)
