"""Event batches through NATS JetStream (events.transport = "nats"), for a fleet past one
origin machine.

A PoP publishes each batch to `adpop.events.<pop>` with the batch id as `Nats-Msg-Id`:
JetStream drops a second publish of one id inside its duplicate window, and its publish
acknowledgement comes only once the stream (with its replicas) holds the message. The
origin's ingest workers share one durable pull consumer: each stores a batch in the event
store, then acks it; a batch whose worker died before the ack is delivered again, and the
store acknowledges a batch id it holds without storing it twice. A batch the store refuses
is terminated (never redelivered) and counted.

The stream is made by the origin (its workers, at start) with events.nats_replicas copies.
Which PoP may publish which subject is the NATS servers' own account configuration; the
store checks that a batch's id names the PoP of its subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import Error as JetStreamError

from appliance.errors import AdpopError
from appliance.events.batch import BATCH_HEADER, Batch
from appliance.events.shipper import DeliveryError

log = logging.getLogger("adpop.events")

STREAM = "ADPOP_EVENTS"
SUBJECTS = "adpop.events.>"
DURABLE = "adpop-ingest"
DUPLICATE_WINDOW = 24 * 3600.0  # seconds; a PoP resends after a crash well within it
PUBLISH_TIMEOUT = 10.0
ACK_WAIT = 60.0  # a worker that took longer is presumed dead: the batch goes to another
FETCH = 8  # batches a worker takes at a time


class NatsProblem(AdpopError):
    """The NATS servers cannot be reached or refuse what is asked."""


def servers(urls: str) -> list[str]:
    return [u.strip() for u in urls.split(",") if u.strip()]


async def connect(urls: str) -> Any:
    try:
        return await nats.connect(servers(urls), connect_timeout=5, allow_reconnect=True,
                                  max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    except (NatsError, OSError, TimeoutError) as exc:
        raise NatsProblem(f"cannot reach NATS at {urls}: {exc or type(exc).__name__}",
                          hint="check events.nats_url and that nats-server runs") from exc


class NatsTransport:
    def __init__(self, urls: str) -> None:
        self.urls = urls
        self.description = f"nats {urls}"
        self.client: Any = None

    async def send(self, batch: Batch) -> None:
        try:
            if self.client is None:
                self.client = await connect(self.urls)
            ack = await self.client.jetstream().publish(
                f"adpop.events.{batch.pop}", batch.payload, timeout=PUBLISH_TIMEOUT,
                stream=STREAM, headers={"Nats-Msg-Id": batch.id, BATCH_HEADER: batch.id})
        except NatsProblem as exc:
            raise DeliveryError(exc.message) from exc
        except (NatsError, JetStreamError, OSError, TimeoutError) as exc:
            raise DeliveryError(f"JetStream did not take batch {batch.id}: "
                                f"{exc or type(exc).__name__}") from exc
        if ack.stream != STREAM:
            raise DeliveryError(f"batch {batch.id} landed in stream {ack.stream}, not "
                                f"{STREAM}", refused=True, reason="wrong-stream")

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(NatsError, OSError):
                await self.client.close()
            self.client = None


async def ensure_stream(js: Any, replicas: int) -> None:
    config = api.StreamConfig(name=STREAM, subjects=[SUBJECTS], storage=api.StorageType.FILE,
                              num_replicas=replicas, duplicate_window=DUPLICATE_WINDOW,
                              retention=api.RetentionPolicy.WORK_QUEUE)
    try:
        await js.add_stream(config)
    except JetStreamError as exc:
        raise NatsProblem(f"cannot make JetStream stream {STREAM}: {exc}",
                          hint="check events.nats_replicas against the cluster's size") from exc


async def ingest(store: Any, urls: str, workers: int, replicas: int,
                 stop: asyncio.Event) -> None:
    """Runs `workers` pull consumers into `store` (an EventStore) until `stop`."""
    from appliance.origin.events import Refused

    client = await connect(urls)
    try:
        js = client.jetstream()
        while not stop.is_set():
            try:
                await ensure_stream(js, replicas)
                break
            except NatsProblem as exc:
                log.warning("%s; trying again", exc.line())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ACK_WAIT,
                                    max_ack_pending=workers * FETCH * 4)

        async def subscribe(n: int) -> Any:
            """The durable consumer, asked again while a cluster is still electing leaders."""
            while True:
                try:
                    return await js.pull_subscribe(SUBJECTS, durable=DURABLE, stream=STREAM,
                                                   config=config)
                except (NatsError, JetStreamError) as exc:
                    log.warning("ingest worker %d: no consumer yet (%s); trying again", n,
                                exc or type(exc).__name__)
                    await asyncio.sleep(1.0)

        async def worker(n: int) -> None:
            sub = await subscribe(n)
            while not stop.is_set():
                try:
                    messages = await sub.fetch(FETCH, timeout=1.0)
                except TimeoutError:
                    continue
                except (NatsError, JetStreamError) as exc:
                    log.warning("ingest worker %d: %s", n, exc or type(exc).__name__)
                    await asyncio.sleep(1.0)
                    continue
                for message in messages:
                    pop = message.subject.rpartition(".")[2]
                    batch_id = (message.headers or {}).get(BATCH_HEADER, "")
                    try:
                        await asyncio.to_thread(store.store, pop, batch_id, message.data)
                    except Refused as exc:
                        log.warning("refused batch %s from %s: %s", batch_id[:120], pop,
                                    exc.line())
                        await message.term()
                        continue
                    except AdpopError as exc:
                        # The store could not write: another worker (or this one) tries
                        # again after the delay.
                        log.error("cannot store batch %s: %s", batch_id[:120], exc.line())
                        await message.nak(delay=5.0)
                        continue
                    # Acked only once stored: a worker killed before this is redelivered.
                    await message.ack()

        await asyncio.gather(*(worker(n) for n in range(workers)))
    finally:
        with contextlib.suppress(NatsError, OSError):
            await client.close()
