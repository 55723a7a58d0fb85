"""Attacks on the one verification path (`rotator.library.checking.Checker`): a token the
verified-token cache answers must get exactly what the full path gives it (the same claims
or the same refusal) whatever the call asks, and the cache, the key set changes and the
usage counts must hold on many threads at once. No Redis: keys and key sets are made here,
as a reader hands them to its `Checker`."""

from __future__ import annotations

import functools
import random
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core.jwk import PublicKey
from rotator.library.checking import Checker
from rotator.library.errors import InvalidToken, UnknownKid
from rotator.library.tokencache import TokenCache
from rotator.library.usage import UNKNOWN_KID, UsageCounter
from rotator.library.verify import (
    HeaderCache,
    _check_claims,
    check_claims,
    claim_times,
    verify_token,
)
from rotator.storage.usage import ACCEPTED
from tests.tokens import es256

NOW = 1_800_000_000
KIDS = ("a", "b", "c")
PRIVATE = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in KIDS}
PUBLIC: dict[str, PublicKey] = {kid: key.public_key() for kid, key in PRIVATE.items()}
BIG = 2**53

#: Claim values a signer could put in a time claim: the usual ints around now, the edges
#: of the NumericDate range and past them, floats, bools, and what is no time at all.
TIMES: tuple[object, ...] = (
    None,
    NOW - 3600,
    NOW - 30,
    NOW - 1,
    NOW,
    NOW + 1,
    NOW + 30,
    NOW + 3600,
    float(NOW + 60),
    NOW + 0.5,
    BIG,
    BIG + 1,
    -BIG,
    -BIG - 1,
    2**64,
    -(2**64),
    True,
    False,
    "1800000060",
    [NOW + 60],
)
AUDIENCES: tuple[object, ...] = (None, "svc", "other", ["svc"], ["other", "svc"], [], ["svc", 1], 7)
ISSUERS: tuple[object, ...] = (None, "iam", "other", 1, ["iam"])
WANTED_AUDIENCES: tuple[str | list[str] | tuple[str, ...] | None, ...] = (
    None,
    "svc",
    "other",
    ["svc"],
    ("other", "svc"),
    [],
)
WANTED_ISSUERS: tuple[str | list[str] | None, ...] = (None, "iam", "other", ["iam", "x"])
# In [0, 2**53]: any other leeway is refused at the door (ValueError, tests/test_verify.py).
LEEWAYS = (0.0, 0, 30, 30.5, 3600, 9e15, 2.0**53)
CALL_TIMES = (float(NOW), NOW + 0.25, float(NOW + 29), float(NOW - 29), float(NOW + 7200))


def outcome(call: Callable[..., object], *args: Any, **kwargs: Any) -> object:
    """What ``call(*args, **kwargs)`` returns, or the class of the `InvalidToken` it
    raises."""
    try:
        return call(*args, **kwargs)
    except InvalidToken as exc:
        return type(exc)


def random_claims(rng: random.Random) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": f"u{rng.randrange(10**6)}"}
    for name, values in (
        ("exp", TIMES),
        ("nbf", TIMES),
        ("iat", TIMES),
        ("aud", AUDIENCES),
        ("iss", ISSUERS),
    ):
        value = rng.choice(values)
        if value is not None or rng.random() < 0.2:  # absent, and sometimes null
            claims[name] = value
    if "exp" not in claims and rng.random() < 0.8:
        claims["exp"] = rng.choice((NOW + 60, NOW - 60, NOW + 3600))
    return claims


def random_call(rng: random.Random) -> dict[str, Any]:
    return {
        "audience": rng.choice(WANTED_AUDIENCES),
        "issuer": rng.choice(WANTED_ISSUERS),
        "leeway": rng.choice(LEEWAYS),
        "now": rng.choice(CALL_TIMES),
    }


def test_the_claims_fast_path_judges_as_the_plain_rules_do() -> None:
    """`check_claims` on a token's `claim_times` (what a hit and a fresh verify both run)
    against `_check_claims` alone, the plain rules: the same refusal, or none, for every
    shape of claims and every call, the largest leeway allowed included."""
    rng = random.Random(20261202)
    differ = []
    for _ in range(20_000):
        claims, call = random_claims(rng), random_call(rng)
        plain = outcome(
            _check_claims, claims, call["audience"], call["issuer"], call["leeway"], call["now"]
        )
        fast = outcome(check_claims, claims, claim_times(claims), **call)
        if plain != fast:
            differ.append((claims, call, plain, fast))
    assert differ == []


def test_a_cached_token_is_answered_as_the_full_path_answers_it() -> None:
    """Tokens of random claims, each verified many times with random calls, hits and
    misses mixed (a small cache, so entries are dropped and kept again): every answer of
    the caching `Checker` is what `verify_token` without any cache gives (the claims, or
    the refusal's class), and the claims handed out are the caller's own."""
    rng = random.Random(7)
    tokens = [
        es256(PRIVATE[rng.choice(KIDS)], {"alg": "ES256", "kid": rng.choice(KIDS)}, claims)
        if rng.random() < 0.1  # signed by another key than its kid's
        else es256(PRIVATE[kid], {"alg": "ES256", "kid": kid}, claims)
        for kid, claims in ((rng.choice(KIDS), random_claims(rng)) for _ in range(120))
    ]
    # The calls that let most tokens pass, so that most get cached and hit.
    passing: dict[str, Any] = {"audience": None, "issuer": None, "leeway": 3600, "now": NOW}
    checker = Checker(TokenCache(max_entries=16), None, HeaderCache(), 8192)
    differ = []
    for _ in range(6_000):
        token = rng.choice(tokens)
        call = passing if rng.random() < 0.3 else random_call(rng)
        held: Mapping[str, PublicKey] = (
            PUBLIC if rng.random() < 0.8 else {k: PUBLIC[k] for k in KIDS if k != "a"}
        )
        shaped: str | bytes = token.encode() if rng.random() < 0.3 else token
        expected = outcome(verify_token, shaped, held.get, **call)
        got = outcome(checker.verify, shaped, held, held.get, **call)
        if expected != got:
            differ.append((token, call, expected, got))
        if isinstance(got, dict) and got:
            got.clear()  # the next caller's copy must not notice
    assert differ == []


class _Str(str):
    __slots__ = ()

    def __hash__(self) -> int:
        return hash(str(self))


class _Counting(Mapping[str, PublicKey]):
    """*keys*, counting the keys read from it: a hit reads none (it checks no signature),
    the full way reads the token's."""

    def __init__(self, keys: Mapping[str, PublicKey]) -> None:
        self._keys, self.reads = keys, 0

    def __getitem__(self, kid: str) -> PublicKey:
        self.reads += 1
        return self._keys[kid]

    def __contains__(self, kid: object) -> bool:  # a hit asks this alone
        return kid in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def test_other_token_types_go_the_full_way_and_answer_as_it_does() -> None:
    """A str subclass, a bytearray or a memoryview of a token held by the cache is judged
    afresh (its kid's key is read, or it is refused for its type before), and answered as
    `verify_token` answers it; the exact str and bytes are hits."""
    good = es256(PRIVATE["a"], {"alg": "ES256", "kid": "a"}, {"exp": NOW + 60})
    checker = Checker(TokenCache(), None, HeaderCache(), 8192)
    call: dict[str, Any] = {"audience": None, "issuer": None, "leeway": 0.0, "now": NOW}
    keys = _Counting(PUBLIC)
    checker.verify(good, keys, keys.get, **call)
    checker.verify(good.encode(), keys, keys.get, **call)
    for shaped, reads in (
        (good, 0),
        (good.encode(), 0),
        (_Str(good), 1),
        (bytearray(good.encode()), 1),
        (memoryview(good.encode()), 0),
    ):
        before = keys.reads
        expected = outcome(verify_token, shaped, PUBLIC.get, **call)
        got = outcome(checker.verify, shaped, keys, keys.get, **call)
        assert (got, keys.reads - before) == (expected, reads)
    assert len(checker.tokens) == 2


def assert_consistent(cache: TokenCache) -> None:
    """The cache's index names each entry once, and its bytes are its entries'."""
    with cache._lock:
        entries = dict(cache._entries)
        assert sum(len(t) for t in cache._by_kid.values()) == len(entries)
        assert all(token in entries for t in cache._by_kid.values() for token in t)
        assert cache.size_bytes == sum(2 * len(token) for token in entries)


def run_threads(
    workers: list[Callable[[], None]], helpers: list[Callable[[], None]], done: threading.Event
) -> None:
    """Run *workers* and *helpers* on threads of their own; set *done* once the workers
    are through, and wait for the helpers to see it."""
    threads = [threading.Thread(target=target) for target in workers]
    others = [threading.Thread(target=target) for target in helpers]
    for thread in threads + others:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    for thread in others:
        thread.join()


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Threads switched every microsecond, so that the lock-free steps interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
def test_many_threads_hits_misses_evictions_and_key_set_changes() -> None:
    """Eight threads verify tokens of three kids through one small cache while a ninth
    swaps the key set the reader holds (a kid removed, then back, or no trusted set at
    all), and half the calls hold an older copy: nothing but an `InvalidToken` escapes, a token is answered only when its kid is
    in the key set the call was given, the counts are exact, and the cache's bounds and
    its index hold."""
    tokens = {
        kid: [
            es256(PRIVATE[kid], {"alg": "ES256", "kid": kid}, {"exp": NOW + 60, "n": i})
            for i in range(12)
        ]
        for kid in KIDS
    }
    sets: list[Mapping[str, PublicKey] | None] = [
        dict(PUBLIC),
        {"b": PUBLIC["b"], "c": PUBLIC["c"]},
        {"a": PUBLIC["a"]},
        None,
        dict(PUBLIC),
    ]
    held: list[Mapping[str, PublicKey] | None] = [sets[0]]
    cache = TokenCache(max_entries=7, max_bytes=7 * 2 * len(tokens["a"][0]))
    usage = UsageCounter("default", wall_clock=lambda: float(NOW))
    checker = Checker(cache, usage, HeaderCache(), 8192)
    done = threading.Event()
    failures: list[BaseException] = []
    expected: Counter[tuple[str, str]] = Counter()
    expected_lock = threading.Lock()
    bounds_broken: list[tuple[int, int]] = []

    def lookup_in(keys: Mapping[str, PublicKey] | None) -> Callable[[str], PublicKey | None]:
        return lambda kid: None if keys is None else keys.get(kid)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: Counter[tuple[str, str]] = Counter()
        try:
            for _ in range(1_500):
                kid = rng.choice(KIDS)
                token = rng.choice(tokens[kid])
                # Half the calls hold a copy of their own, as a verification that read
                # the key set before a refresh does: the hits and keeps of such calls
                # move the cache's followed set back and forth.
                keys = held[0] if rng.random() < 0.5 else rng.choice(sets)
                try:
                    claims = checker.verify(
                        token,
                        keys,
                        lookup_in(keys),
                        audience=None,
                        issuer=None,
                        leeway=0.0,
                        now=NOW,
                    )
                except UnknownKid:
                    assert keys is None or kid not in keys
                    mine["refused:UnknownKid", UNKNOWN_KID] += 1
                else:
                    assert keys is not None and kid in keys, "answered for a removed kid"
                    assert claims["exp"] == NOW + 60
                    mine[ACCEPTED, kid] += 1
                if len(cache) > cache.max_entries or cache.size_bytes > cache.max_bytes:
                    bounds_broken.append((len(cache), cache.size_bytes))
        except BaseException as exc:
            failures.append(exc)
        with expected_lock:
            expected.update(mine)

    def switcher() -> None:
        rng = random.Random(99)
        while not done.is_set():
            held[0] = rng.choice(sets)
            # A follow from here too, as a reader's refresh makes the next hit do.
            cache.follow(held[0])

    taken: Counter[tuple[str, str]] = Counter()

    def taker() -> None:
        while not done.is_set():
            for counts in usage.take():
                taken.update(counts.counts)

    run_threads([functools.partial(worker, seed) for seed in range(8)], [switcher, taker], done)
    for counts in usage.take():
        taken.update(counts.counts)
    assert failures == []
    assert bounds_broken == []
    assert taken == expected
    assert_consistent(cache)


class _RacedCache(TokenCache):
    """A cache on which another call runs between a hit's `follow` and its read of the
    entries: the interleaving the hit's own kid check is there for."""

    between: Callable[[], object] | None = None

    def follow(self, keys: Mapping[str, object] | None) -> None:
        super().follow(keys)
        between, self.between = self.between, None
        if between is not None:
            between()


def test_a_hit_answers_no_token_of_a_kid_its_own_key_set_lacks_whatever_ran_between() -> None:
    """A call holding the key set without kid ``a`` follows it (dropping ``a``'s tokens);
    before it reads the cache, a call still holding the older set follows that back and
    keeps a token of ``a`` again. The first call must not answer that token: its kid is
    not in the key set it was given."""
    token = es256(PRIVATE["a"], {"alg": "ES256", "kid": "a"}, {"exp": NOW + 60})
    cache = _RacedCache()
    checker = Checker(cache, None, HeaderCache(), 8192)
    call: dict[str, Any] = {"audience": None, "issuer": None, "leeway": 0.0, "now": NOW}
    older = dict(PUBLIC)
    newer = {"b": PUBLIC["b"], "c": PUBLIC["c"]}
    checker.verify(token, older, older.get, **call)
    cache.between = lambda: checker.verify(token, older, older.get, **call)
    with pytest.raises(UnknownKid):
        checker.verify(token, newer, newer.get, **call)
    assert len(cache) == 1  # the older call's keep did happen in between
