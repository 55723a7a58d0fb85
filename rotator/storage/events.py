"""Following commits: a subscription to ``P:events`` with a polling backstop.

Pub/sub delivers at most once and drops messages while disconnected, so the
follower also calls ``on_poll`` every ``poll_interval`` and ``on_connect``
after every (re)subscription; a lost message costs at most one poll
interval, never correctness.

A subscription can also die without a word: a partition that drops packets
but closes nothing, a paused Redis. Nothing arrives and no call fails. So
redis-py PINGs the subscription's connection (its ``health_check_interval``,
`HEALTH_CHECK_INTERVAL` here) and `PingWatch` counts the connection dead
when an answer is more than `REPLY_TIMEOUT` late; the follower then
resubscribes. A follower is `subscribed` from the catch-up read that follows
Redis's confirmation of the SUBSCRIBE (``on_connect``: what was committed
before it) until then, so ``following`` says within seconds that pushes no
longer arrive. (Set at the confirmation, it said "following" while that read
could still hang on a partition that came right after, for as long as the
read's timeouts and retries last, with no PING watched meanwhile.) Nothing a
callback raises ends the loop: it is logged, and the follower goes on (or
resubscribes, if the subscription itself broke).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from rotator.core import strictjson
from rotator.storage.layout import validate_keyset_name

__all__ = [
    "HEALTH_CHECK_INTERVAL",
    "REPLY_TIMEOUT",
    "CallbackFailures",
    "EventFollower",
    "PingWatch",
    "SilentSubscription",
    "keyset_of",
    "unwatch_connection",
    "watch_connection",
]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0
# A commit message is well under 300 bytes; a larger one is not rotator's.
_MAX_MESSAGE = 4096
#: Seconds of silence on a subscription before redis-py PINGs it.
HEALTH_CHECK_INTERVAL = 1.0
#: Seconds a PING, or the SUBSCRIBE itself, may go unanswered before the subscription
#: counts as dead.
REPLY_TIMEOUT = 3.0


def keyset_of(data: object) -> str | None:
    """The key set named by an events-channel message, ``None`` if it names no valid one
    (whatever the message: anyone who may publish on the channel can send anything)."""
    if not isinstance(data, bytes | str) or len(data) > _MAX_MESSAGE:
        return None
    try:
        message = strictjson.loads(data)
    except strictjson.JSONError:
        return None
    keyset = message.get("keyset") if isinstance(message, dict) else None
    try:
        return validate_keyset_name(keyset) if isinstance(keyset, str) else None
    except ValueError:
        return None


class SilentSubscription(redis.ConnectionError):
    """The subscription's connection stopped answering (a silent partition, a paused
    Redis)."""


@dataclass
class PingWatch:
    """Whether redis-py's health-check PINGs on one subscription connection are answered.
    Pure: the loop reports every read it makes on that connection (sync or asyncio), and
    only that loop touches it (one per subscription, owned by its follower).

    redis-py sends a PING at the start of a read once the connection's
    ``next_health_check`` has passed, and pushes that mark on after every reply read; a
    mark that did not move across a read means nothing arrived during it."""

    reply_timeout: float = REPLY_TIMEOUT
    pinged_at: float | None = None

    def saw(self, started: float, due_before: float, due_after: float, now: float) -> None:
        """Record one read that began at *started* with the next health check due at
        *due_before* and ended at *now* with it due at *due_after*; raise
        `SilentSubscription` once a PING has waited longer than the reply timeout."""
        if due_after != due_before:
            self.pinged_at = None  # a reply arrived: the connection is alive
        elif started > due_before and self.pinged_at is None:
            self.pinged_at = started  # redis-py sent a PING as this read began
        if self.pinged_at is not None and now - self.pinged_at > self.reply_timeout:
            raise SilentSubscription(
                f"no answer to a PING on the subscription for {now - self.pinged_at:.1f}s"
            )


def watch_connection(pubsub: Any) -> int | float:
    """Turn on redis-py's health check on the connection of *pubsub* (after its first
    SUBSCRIBE); return the interval it had, for `unwatch_connection`."""
    connection = pubsub.connection
    before: int | float = connection.health_check_interval
    connection.health_check_interval = HEALTH_CHECK_INTERVAL
    return before


def unwatch_connection(pubsub: Any, interval: int | float) -> None:
    """Give the connection of *pubsub* back its own interval before it returns to the pool
    (the other commands of that pool are not meant to PING first)."""
    if pubsub.connection is not None:
        pubsub.connection.health_check_interval = interval


class CallbackFailures:
    """Logs each distinct failure of a callback once, until it succeeds again. Owned by
    one follower (its thread, or its task on the event loop)."""

    def __init__(self) -> None:
        self.last: str | None = None

    def failed(self, what: str, exc: BaseException) -> None:
        text = f"events follower: {what} failed ({type(exc).__name__}: {exc}); following on"
        if text != self.last:
            log.error("%s", text)
            self.last = text

    def succeeded(self) -> None:
        self.last = None


class EventFollower:
    """A daemon thread calling *on_event(keyset)* for every commit message, *on_poll()*
    every *poll_interval* seconds, and *on_connect()* after each (re)subscription.

    The callbacks run on the follower's own thread, so what they touch must be safe
    to reach from it (the readers' caches take their lock). `subscribed` and the stop
    request are events, read and set from any thread; the rest is the thread's own."""

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        *,
        on_event: Callable[[str], object],
        on_poll: Callable[[], object],
        on_connect: Callable[[], object],
        poll_interval: float,
        name: str = "rotator-follower",
    ) -> None:
        self.client = client
        self.channel = channel
        self.on_event, self.on_poll, self.on_connect = on_event, on_poll, on_connect
        self.poll_interval = poll_interval
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._callbacks = CallbackFailures()

    def start(self) -> None:
        """Start following in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self.client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
            interval: int | float = 0
            try:
                pubsub.subscribe(self.channel)
                interval = watch_connection(pubsub)
                self._confirm(pubsub)
                self._call("on_connect", self.on_connect)
                self.subscribed.set()  # after the catch-up read: nothing missed is left
                backoff = 0.1
                self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("events subscription lost (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except Exception as exc:
                # Whatever redis-py or a message does, the follower must not die.
                self.subscribed.clear()
                log.error(
                    "events follower: unexpected %s (%s); resubscribing in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            finally:
                unwatch_connection(pubsub, interval)
                pubsub.close()
        self.subscribed.clear()

    def _confirm(self, pubsub: redis.client.PubSub) -> None:
        """Wait for Redis to confirm the SUBSCRIBE (sent, not yet answered)."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SilentSubscription(f"no answer to SUBSCRIBE within {REPLY_TIMEOUT:g}s")
            message = pubsub.get_message(timeout=min(left, 1.0))
            if message is not None and message.get("type") == "subscribe":
                return

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        connection: Any = pubsub.connection
        pings = PingWatch()
        next_poll = time.monotonic() + self.poll_interval
        while not self._stop.is_set():
            started = time.monotonic()
            due = connection.next_health_check
            message = pubsub.get_message(timeout=max(0.0, min(1.0, next_poll - started)))
            pings.saw(started, due, connection.next_health_check, time.monotonic())
            kind = message.get("type") if message is not None else None
            if kind == "message":
                keyset = keyset_of(message["data"])
                if keyset is not None:
                    self._call("on_event", self.on_event, keyset)
            elif kind == "subscribe":  # redis-py reconnected and resubscribed by itself
                self._call("on_connect", self.on_connect)
            if time.monotonic() >= next_poll:
                self._call("on_poll", self.on_poll)
                next_poll = time.monotonic() + self.poll_interval

    def _call(self, what: str, callback: Callable[..., object], *args: str) -> None:
        try:
            callback(*args)
        except Exception as exc:
            self._callbacks.failed(what, exc)
        else:
            self._callbacks.succeeded()
