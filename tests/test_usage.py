"""Verification counts: readers count per kid and outcome in memory and report them to a
real Redis in one pipeline per flush; hostile kids share one bucket; a reader cut off from
Redis keeps verifying and drops, counted, what it could not report in time."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import redis
from prometheus_client import CollectorRegistry

from rotator.core.envelope import Keyring
from rotator.core.jwk import generate_key, load_private_key
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.aioreader import AsyncJWKSReader
from rotator.library.errors import InvalidAudience, MalformedToken, UnknownKid
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.library.usage import UsageCounter
from rotator.metrics import register_reader_metrics
from rotator.storage.layout import Layout
from rotator.storage.usage import (
    ACCEPTED,
    KEYSETS_PER_ROUND_TRIP,
    MAX_USAGE_BYTES,
    MAX_USAGE_FIELDS,
    keep_kids,
    read_usage,
    read_usage_many,
)
from tests.helpers import FakeClock, wait_for
from tests.tokens import es256

CLAIMS = {"sub": "u", "iss": "iam", "aud": "svc"}
LAYOUT = Layout()


def sign(redis_server: EmbeddedRedis, keyring: Keyring, count: int) -> tuple[str, list[str]]:
    with Signer(redis_server.url, keyring, max_token_ttl=3600, follow=False) as signer:
        tokens = [signer.sign(CLAIMS, ttl=60) for _ in range(count)]
        return signer.current_kid or "", tokens


def hostile_tokens(count: int) -> list[str]:
    """Well-formed tokens naming *count* different kids no key set holds."""
    private = load_private_key(generate_key().private_der)
    return [es256(private, {"alg": "ES256", "kid": f"evil-{i}"}, CLAIMS) for i in range(count)]


def totals(client: redis.Redis) -> dict[str, int]:
    """The usage totals of key set ``default`` as Redis holds them."""
    found: dict[bytes, bytes] = client.hgetall(LAYOUT.usage("default"))  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in found.items()}


def test_a_reader_reports_each_outcome_per_kid_with_hostile_kids_in_one_bucket(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, client: redis.Redis
) -> None:
    manager.reconcile("default")
    kid, tokens = sign(redis_server, keyring, 3)
    with JWKSReader(redis_server.url, follow=False, unknown_kid_cooldown=3600) as reader:
        for token in tokens:
            reader.verify(token, audience="svc", issuer="iam")
        with pytest.raises(InvalidAudience):
            reader.verify(tokens[0], audience="other", issuer="iam")
        for token in hostile_tokens(50):
            with pytest.raises(UnknownKid):
                reader.verify(token, audience="svc", issuer="iam")
        with pytest.raises(MalformedToken):
            reader.verify("not.a.token", audience="svc", issuer="iam")
    found = totals(client)
    last = found.pop(f"last:{kid}")
    assert found == {
        f"accepted:{kid}": 3,
        f"refused:InvalidAudience:{kid}": 1,
        "refused:UnknownKid:unknown": 50,
        "refused:MalformedToken:-": 1,
    }
    assert last > 0
    assert client.ttl(LAYOUT.usage("default")) > 0
    minutes = list(client.scan_iter(f"{LAYOUT.usage('default')}:*"))
    assert minutes and all(client.ttl(name) > 0 for name in minutes)


def test_tokens_answered_by_the_token_cache_are_counted_under_their_kid(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, client: redis.Redis
) -> None:
    manager.reconcile("default")
    kid, (token,) = sign(redis_server, keyring, 1)
    with JWKSReader(redis_server.url, follow=False) as reader:
        for _ in range(4):
            reader.verify(token, audience="svc", issuer="iam")
        with pytest.raises(InvalidAudience):
            reader.verify(token, audience="other", issuer="iam")
        assert len(reader.tokens) == 1  # three of the four were hits
    found = totals(client)
    found.pop(f"last:{kid}")
    assert found == {f"accepted:{kid}": 4, f"refused:InvalidAudience:{kid}": 1}


def test_verifications_on_many_threads_are_counted_to_the_last_while_flushes_take_them(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    """Accepted verifications are counted without a lock (`UsageCounter.accepted`): none
    is lost or counted twice, however the threads and the flushes that take the counts
    interleave."""
    manager.reconcile("default")
    kid, tokens = sign(redis_server, keyring, 4)
    threads, each = 8, 2_000
    # The reader's own flusher waits an hour: the counts are taken here alone.
    reader = JWKSReader(redis_server.url, follow=False, usage_interval=3600).start()
    usage = reader.usage
    assert usage is not None
    taken: list[int] = []
    done = threading.Event()

    def take() -> None:  # a flush's share, as often as it can
        while not done.is_set():
            taken.extend(c.counts.get((ACCEPTED, kid), 0) for c in usage.take())

    def verify(index: int) -> None:
        for _ in range(each):
            reader.verify(tokens[index % len(tokens)], audience="svc", issuer="iam")

    taker = threading.Thread(target=take)
    taker.start()
    workers = [threading.Thread(target=verify, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    taker.join()
    taken.extend(c.counts.get((ACCEPTED, kid), 0) for c in usage.take())
    reader.close()
    assert sum(taken) == threads * each


def test_counts_are_flushed_in_the_background_while_the_reader_runs(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, client: redis.Redis
) -> None:
    manager.reconcile("default")
    kid, tokens = sign(redis_server, keyring, 2)
    with JWKSReader(redis_server.url, follow=False, usage_interval=0.05) as reader:
        for token in tokens:
            reader.verify(token, audience="svc", issuer="iam")
        wait_for(lambda: totals(client).get(f"accepted:{kid}") == 2, what="a flush")


def test_turned_off_nothing_is_counted_or_written(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, client: redis.Redis
) -> None:
    manager.reconcile("default")
    _kid, tokens = sign(redis_server, keyring, 1)
    with JWKSReader(redis_server.url, follow=False, report_usage=False) as reader:
        reader.verify(tokens[0], audience="svc", issuer="iam")
        assert reader.usage is None
    assert not list(client.scan_iter(f"{LAYOUT.usage('default')}*"))


def test_the_async_reader_reports_too(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, client: redis.Redis
) -> None:
    manager.reconcile("default")
    kid, tokens = sign(redis_server, keyring, 4)

    async def run() -> None:
        async with AsyncJWKSReader(redis_server.url, follow=False) as reader:
            for token in tokens:
                await reader.verify(token, audience="svc", issuer="iam")
            with pytest.raises(UnknownKid):
                await reader.verify(hostile_tokens(1)[0], audience="svc", issuer="iam")

    asyncio.run(run())
    found = totals(client)
    assert found[f"accepted:{kid}"] == 4
    assert found["refused:UnknownKid:unknown"] == 1


def test_a_reader_cut_off_keeps_verifying_and_drops_old_counts_counted(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    manager.reconcile("default")
    _kid, tokens = sign(redis_server, keyring, 5)
    wall = FakeClock(now=time.time())
    registry = CollectorRegistry()
    metrics = register_reader_metrics(registry)
    reader = JWKSReader(redis_server.url, follow=False, wall_clock=wall, metrics=metrics).start()
    assert reader.usage is not None and reader._flusher is not None
    sample = ("rotator_reader_usage_dropped_total", {"keyset": "default"})
    redis_server.stop()
    for token in tokens:
        assert reader.verify(token, audience="svc", issuer="iam")["sub"] == "u"
    assert not reader._flusher.flush()
    kept = reader.usage.take()
    assert sum(counts.total() for counts in kept) == 5  # kept for the next flush
    reader.usage.restore(kept)
    wall.advance(reader.usage.hold + 60)
    assert not reader._flusher.flush()
    assert reader.usage.dropped == 5
    assert registry.get_sample_value(*sample) == 5
    assert reader.usage.take() == []
    reader.close()


def test_a_restore_merges_with_counts_made_since() -> None:
    wall = FakeClock()
    counter = UsageCounter("default", wall_clock=wall)
    counter.record("k1", ACCEPTED)
    taken = counter.take()
    wall.advance(1)
    counter.record("k1", ACCEPTED)
    counter.restore(taken)
    (merged,) = counter.take()
    assert merged.counts == {(ACCEPTED, "k1"): 2}
    assert merged.last == {"k1": int(wall.now)}


def test_usage_read_back_skips_what_does_not_parse(client: redis.Redis) -> None:
    now = 1_800_000_000.0
    client.hset(
        LAYOUT.usage("default"),
        mapping={
            "accepted:k1": 7,
            "refused:ExpiredToken:k1": 2,
            "last:k1": 1_799_999_990,
            "accepted:k2": "seven",
            "bogus:k3": 1,
            "accepted:": 4,
            b"accepted:\xff": 1,
            "accepted:k4": -3,
        },
    )
    client.hset(LAYOUT.usage_minute("default", int(now // 60)), "accepted:k1", 3)
    client.hset(LAYOUT.usage_minute("default", int(now // 60) - 20), "accepted:k1", 100)
    found = read_usage(client, LAYOUT, "default", now, 900)
    assert set(found) == {"k1"}
    usage = found["k1"]
    assert (usage.total, usage.recent, usage.accepted) == (9, 3, 7)
    assert usage.refused == {"ExpiredToken": 2}
    assert usage.last_verified == 1_799_999_990


def test_usage_of_many_key_sets_is_read_in_round_trips_of_bounded_size(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round trip per `KEYSETS_PER_ROUND_TRIP` key sets, whatever their number, and
    no more in one: each may send `MAX_USAGE_BYTES`."""
    now = 1_800_000_000.0
    keysets = [f"ks{n}" for n in range(1, KEYSETS_PER_ROUND_TRIP + 5)]
    for n, keyset in enumerate(keysets, start=1):
        client.hset(LAYOUT.usage(keyset), "accepted:k1", n)
        client.hset(LAYOUT.usage_minute(keyset, int(now // 60)), "accepted:k1", 10 * n)
    client.script_flush()  # loaded once, then sent again: not a round trip a key set
    executed: list[int] = []
    execute = redis.client.Pipeline.execute

    def counting(pipe: redis.client.Pipeline, raise_on_error: bool = True) -> list[object]:
        executed.append(len(pipe.command_stack))
        return execute(pipe, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    found = read_usage_many(client, LAYOUT, keysets, now, 900)
    assert executed == [KEYSETS_PER_ROUND_TRIP, KEYSETS_PER_ROUND_TRIP, 4]
    assert {keyset: (u["k1"].total, u["k1"].recent) for keyset, u in found.items()} == {
        keyset: (n, 10 * n) for n, keyset in enumerate(keysets, start=1)
    }


def test_an_honest_usage_hash_of_as_many_fields_as_read_is_read(client: redis.Redis) -> None:
    """The totals keep a field for every kid ever counted: `MAX_USAGE_FIELDS` of them,
    each of the longest reason and a thumbprint kid, fit `MAX_USAGE_BYTES` (a first bound
    of 256 KiB refused 4,500 of them)."""
    kids = [f"{i:043d}" for i in range(MAX_USAGE_FIELDS // 2)]
    client.hset(
        LAYOUT.usage("default"),
        mapping={
            **{f"refused:UnsupportedCritical:{kid}": 2**62 for kid in kids},
            **{f"last:{kid}": 1_799_999_999 for kid in kids},
        },
    )
    found = read_usage(client, LAYOUT, "default", 1_800_000_000.0, 900)
    assert len(found) == len(kids)
    assert found[kids[-1]].refused == {"UnsupportedCritical": 2**62}


def test_a_last_seen_time_past_the_year_3000_is_no_time(client: redis.Redis) -> None:
    """Any verifier may write it; before, `rotator status` printed it with a traceback
    (year 10000 is out of range)."""
    client.hset(LAYOUT.usage("default"), mapping={"accepted:k1": 1, "last:k1": 2**62})
    found = read_usage(client, LAYOUT, "default", 1_800_000_000.0, 900)
    assert found["k1"].accepted == 1 and found["k1"].last_verified is None


def test_a_usage_hash_of_another_type_counts_nothing_for_its_key_set_alone(
    client: redis.Redis,
) -> None:
    """Before: WRONGTYPE for one key set failed `rotator status` for every key set."""
    client.rpush(LAYOUT.usage("bad"), "a")
    client.hset(LAYOUT.usage("good"), "accepted:k1", 4)
    found = read_usage_many(client, LAYOUT, ["bad", "good"], 1_800_000_000.0, 900)
    assert found["bad"] == {}
    assert found["good"]["k1"].accepted == 4


def test_a_poisoned_counter_does_not_make_honest_counts_count_again(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, client: redis.Redis
) -> None:
    """A field written by hand that is not a number fails its HINCRBY; before, the whole
    report was given back and sent again at every flush, so the writes that had gone
    through (the minute's counts) counted again each time: 200 for 10 in 20 s."""
    manager.reconcile("default")
    kid, tokens = sign(redis_server, keyring, 10)
    client.hset(LAYOUT.usage("default"), f"accepted:{kid}", "poison")
    reader = JWKSReader(redis_server.url, follow=False).start()
    assert reader._flusher is not None
    for token in tokens:
        reader.verify(token, audience="svc", issuer="iam")
    assert not reader._flusher.flush()  # refused in part
    for _ in range(3):
        reader._flusher.flush()
    reader.close()
    minutes = [n for n in client.scan_iter(f"{LAYOUT.usage('default')}:*")]
    counted = sum(int(client.hget(n, f"accepted:{kid}") or 0) for n in minutes)
    assert counted == 10


@pytest.mark.parametrize("role", ["daemon", "without-memory"])
@pytest.mark.parametrize("where", ["value", "field"])
def test_a_usage_hash_of_too_many_bytes_is_neither_sent_nor_copied(
    client: redis.Redis, caplog: pytest.LogCaptureFixture, where: str, role: str
) -> None:
    """Any verifier may write a value or a field name of any length: before, one of
    300 MB passed the field count and took `rotator status` 7 s and 1.5 GB, and the
    daemon reading usage at an expiry as much. `MEMORY USAGE` measures it in place (a
    first script copied it inside Redis to measure it, 320 ms for 100 MB); a role
    without it (an older ACL) copies it there, and still sends none of it."""
    now = 1_800_000_000.0
    big = "9" * (MAX_USAGE_BYTES + 1)
    totals = LAYOUT.usage("bad")
    client.hset(totals, "accepted:k1", 3)
    if where == "value":
        client.hset(totals, "accepted:k2", big)
    else:
        client.hset(totals, f"accepted:{big}", 1)
    client.hset(LAYOUT.usage_minute("bad", int(now // 60)), "accepted:k1", 2)
    client.hset(LAYOUT.usage("good"), "accepted:k1", 4)
    reader = client
    if role == "without-memory":
        client.acl_setuser(
            "old", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-memory"]
        )
        reader = redis.Redis(
            port=client.connection_pool.connection_kwargs["port"], username="old", password="pw"
        )
    client.config_resetstat()
    with caplog.at_level(logging.WARNING):
        found = read_usage_many(reader, LAYOUT, ["bad", "good"], now, 900)
    stats = client.info("stats")
    assert stats["total_net_output_bytes"] < MAX_USAGE_BYTES
    copied = client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
    # The minute of "bad" and the totals of "good" alone, unless the role cannot measure.
    assert copied == (2 if role == "daemon" else 3)
    # The totals count nothing; the minutes, written apart, still count.
    assert found["bad"]["k1"].total == 0 and found["bad"]["k1"].recent == 2
    assert found["good"]["k1"].accepted == 4
    assert f"{totals}: usage past {MAX_USAGE_BYTES} bytes for its key set: not read" in (
        caplog.text
    )


def test_a_key_sets_hashes_share_one_budget_of_bytes(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """`MAX_USAGE_BYTES` bounds a key set's hashes together, its totals first: each minute
    within it alone would let a window of them send sixteen times as much."""
    now = 1_800_000_000.0
    quarter = "9" * (MAX_USAGE_BYTES // 4)
    client.hset(LAYOUT.usage("bad"), mapping={"accepted:k1": 3, "accepted:x": quarter})
    minute = int(now // 60)
    for back in range(3):
        name = LAYOUT.usage_minute("bad", minute - back)
        client.hset(name, mapping={"accepted:k1": 1, "accepted:x": quarter})
    with caplog.at_level(logging.WARNING):
        found = read_usage(client, LAYOUT, "bad", now, 900)
    assert found["k1"].total == 3 and found["k1"].recent == 2  # two of the three minutes
    assert caplog.text.count("for its key set: not read") == 1


def test_a_usage_hash_of_too_many_fields_is_not_read(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Any verifier may write fields: before, one of a million took `rotator status` 5 s
    and 500 MB (and the daemon's tick as long, reading usage at an expiry)."""
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, MAX_USAGE_FIELDS + 1, 5000):
            pipe.hset(
                LAYOUT.usage("bad"),
                mapping={f"accepted:k{i}": 1 for i in range(start, start + 5000)},
            )
        pipe.execute()
    client.hset(LAYOUT.usage("good"), "accepted:k1", 4)
    with caplog.at_level(logging.WARNING):
        found = read_usage_many(client, LAYOUT, ["bad", "good"], 1_800_000_000.0, 900)
    assert found["bad"] == {} and found["good"]["k1"].accepted == 4
    assert "not read" in caplog.text


def test_a_sweep_keeps_the_counts_of_the_kids_kept_and_deletes_a_hash_past_the_bounds(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """`keep_kids` parses each field's kid as readers write it (a kid may hold a colon),
    deletes a totals hash over the read bounds whole without copying its names (it
    counts nothing, and nothing else would bring it back under them), and leaves a key
    of another type alone."""
    client.hset(
        LAYOUT.usage("a"),
        mapping={"accepted:k:1": 1, "refused:BadSignature:k:1": 1, "accepted:k": 4, "x": 1},
    )
    client.hset(LAYOUT.usage("b"), f"accepted:{'9' * (MAX_USAGE_BYTES + 1)}", 1)
    client.set(LAYOUT.usage("c"), "a string")
    client.config_resetstat()
    client.script_flush()  # loaded once and the round trip sent again
    with caplog.at_level(logging.WARNING):
        assert keep_kids(client, LAYOUT, {"a": ["k"], "b": ["k"], "c": ["k"], "d": []}) == {}
    assert client.hgetall(LAYOUT.usage("a")) == {b"accepted:k": b"4"}
    assert not client.exists(LAYOUT.usage("b"))
    assert client.get(LAYOUT.usage("c")) == b"a string"
    assert client.info("commandstats")["cmdstat_hkeys"]["calls"] == 1  # "a" alone
    assert f"{LAYOUT.usage('b')} was over the bounds it is read within: deleted" in caplog.text


def test_a_sweep_by_a_role_that_may_not_measure_fails_rather_than_sweeping_nothing(
    client: redis.Redis,
) -> None:
    client.hset(LAYOUT.usage("a"), "accepted:gone", 1)
    client.acl_setuser(
        "no-hlen", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-hlen"]
    )
    port = client.connection_pool.connection_kwargs["port"]
    refused = redis.Redis(port=port, username="no-hlen", password="pw")
    failed = keep_kids(refused, LAYOUT, {"a": ["k"]})
    assert list(failed) == ["a"] and "can't run this command" in str(failed["a"])
    assert client.hget(LAYOUT.usage("a"), "accepted:gone") == b"1"
