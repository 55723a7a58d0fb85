"""`rotator.serve.policies` and `rotator.serve.answers`: what serve knows of each key set's
policy, and the answers it keeps, against a real Redis."""

from __future__ import annotations

import threading

from rotator.config import Settings, load_settings
from rotator.core.policy import Policy
from rotator.embedded import EmbeddedRedis
from rotator.serve.answers import AnswerCache, Answers
from rotator.serve.httpd import reply
from rotator.serve.policies import Policies
from rotator.storage.registry import KeySets
from rotator.storage.store import Store
from tests.helpers import FakeClock


class FirstReadLate(KeySets):
    """Its first `read_policy` returns what it read only once the test says so."""

    def __init__(self, settings: Settings, store: Store) -> None:
        super().__init__(settings, store)
        self.first_read = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def read_policy(self, name: str) -> Policy:
        self.calls += 1
        policy = super().read_policy(name)
        if self.calls == 1:
            self.first_read.set()
            assert self.release.wait(30)
        return policy


def test_an_earlier_read_of_an_entry_never_replaces_a_later_one(
    redis_server: EmbeddedRedis, store: Store, clock: FakeClock
) -> None:
    """An announcement's read that returns last must not put back the policy it read
    before a later read (on another thread) saw the update."""
    settings = load_settings(None, redis={"url": redis_server.url})
    store.register("shop", '{"cache_max_age": "10s"}')
    keysets = FirstReadLate(settings, store)
    policies = Policies(settings, keysets, clock=clock, poll_interval=30, size=10)
    early = threading.Thread(target=policies.learn, args=("shop",))
    early.start()
    assert keysets.first_read.wait(30)  # it has read 10s, and waits
    clock.advance(1)
    assert store.replace_entry("shop", '{"cache_max_age": "10s"}', '{"cache_max_age": "9s"}')
    policies.learn("shop")
    assert policies.policy("shop").cache_max_age == 9
    generation = policies.generation
    keysets.release.set()
    early.join(30)
    assert policies.policy("shop").cache_max_age == 9
    assert policies.generation == generation  # nothing changed: answers built stay


def test_a_change_read_bumps_the_generation_with_it(
    redis_server: EmbeddedRedis, store: Store, clock: FakeClock
) -> None:
    settings = load_settings(None, redis={"url": redis_server.url})
    store.register("shop", '{"cache_max_age": "10s"}')
    policies = Policies(settings, KeySets(settings, store), clock=clock, poll_interval=30, size=10)
    policies.read_registry()
    generation, policy = policies.stamped("shop")
    assert policy.cache_max_age == 10
    clock.advance(1)
    policies.learn("shop")  # a commit announced: same policy
    assert policies.stamped("shop") == (generation, policy)
    assert store.replace_entry("shop", '{"cache_max_age": "10s"}', '{"cache_max_age": "9s"}')
    policies.learn("shop")
    newer, policy = policies.stamped("shop")
    assert newer > generation and policy.cache_max_age == 9


def test_answers_are_kept_per_copy_and_generation_within_their_bound() -> None:
    answers = AnswerCache(2)
    built = {name: Answers("e1", 0, reply(200, []), reply(304, []), "e1") for name in "abc"}
    answers.put("a", built["a"])
    assert answers.get("a", "e1", 0) is built["a"]
    assert answers.get("a", "e2", 0) is None  # another copy
    assert answers.get("a", "e1", 1) is None  # another generation of the policies
    answers.put("b", built["b"])
    answers.put("c", built["c"])
    assert len(answers) == 2 and answers.get("a", "e1", 0) is None  # the oldest built went
    assert answers.get("c", "e1", 0) is built["c"]


def test_a_keyset_not_registered_or_not_readable_follows_rotation_and_stays_known(
    redis_server: EmbeddedRedis, store: Store, clock: FakeClock
) -> None:
    """So that its requests do not each wait on Redis for its entry, registry read or not;
    until the registry names it."""
    settings = load_settings(
        None, redis={"url": redis_server.url}, rotation={"cache_max_age": "20s"}
    )
    policies = Policies(settings, KeySets(settings, store), clock=clock, poll_interval=30, size=2)
    policies.read_registry()
    assert not policies.known("ghost")
    policies.learn("ghost")
    assert policies.known("ghost") and policies.policy("ghost").cache_max_age == 20
    clock.advance(1)
    policies.read_registry()
    assert policies.known("ghost") and policies.policy("ghost").cache_max_age == 20
    store.register("ghost", '{"cache_max_age": "10s"}')
    clock.advance(1)
    policies.read_registry()
    assert policies.known("ghost") and policies.policy("ghost").cache_max_age == 10
    redis_server.stop()
    policies.learn("other")
    assert policies.known("other") and policies.policy("other").cache_max_age == 20
    policies.learn("third")
    policies.learn("fourth")  # beyond size=2: the oldest read goes
    assert not policies.known("other") and policies.known("fourth")
