"""Following commits: a subscription to ``P:events`` with a polling backstop.

Pub/sub delivers at most once and drops messages while disconnected, so the
follower also calls ``on_poll`` every ``poll_interval`` and ``on_connect``
after every (re)subscription; a lost message costs at most one poll
interval, never correctness.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from rotator import strictjson
from rotator.layout import validate_keyset_name

__all__ = ["EventFollower", "keyset_of"]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0
# A commit message is well under 300 bytes; a larger one is not rotator's.
_MAX_MESSAGE = 4096


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


class EventFollower:
    """A daemon thread calling *on_event(keyset)* for every commit message, *on_poll()*
    every *poll_interval* seconds, and *on_connect()* after each (re)subscription."""

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
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                self.subscribed.set()
                self.on_connect()
                backoff = 0.1
                self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("events subscription lost (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            finally:
                pubsub.close()

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        next_poll = time.monotonic() + self.poll_interval
        while not self._stop.is_set():
            wait = max(0.0, min(1.0, next_poll - time.monotonic()))
            message = pubsub.get_message(timeout=wait)
            if message is not None and message.get("type") == "message":
                keyset = keyset_of(message["data"])
                if keyset is not None:
                    self.on_event(keyset)
            if time.monotonic() >= next_poll:
                self.on_poll()
                next_poll = time.monotonic() + self.poll_interval
