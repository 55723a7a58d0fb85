"""The pure lifecycle: unit cases and a hypothesis state machine over every transition."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rotator.core import lifecycle
from rotator.core.jwk import PRIVATE_MEMBERS, THUMBPRINT_MEMBERS, GeneratedKey, public_jwk
from rotator.core.lifecycle import KidTaken, NoSuchKey, RotationTooSoon, Transition
from rotator.core.policy import Policy
from rotator.core.state import KeySetState, Status, decode_state, encode_state
from tests.helpers import FakeClock, RecordingMint, foreign_jwk, make_keyring

POLICY = Policy(
    interval=100.0, overlap=60.0, max_token_ttl=30.0, clock_skew=5.0, cache_max_age=20.0, jitter=0.0
)
# The state machine runs with jitter, so every invariant is checked with rotations spread.
JITTERED = replace(POLICY, jitter=30.0)


def fresh() -> tuple[FakeClock, RecordingMint, KeySetState]:
    clock = FakeClock()
    mint = RecordingMint(make_keyring("k1"))
    return clock, mint, lifecycle.bootstrap("default", clock.now, mint).state


def statuses(state: KeySetState) -> list[str]:
    return [k.status.value for k in state.keys]


def test_bootstrap_publishes_current_and_next() -> None:
    clock, _mint, state = fresh()
    assert state.version == 1
    assert statuses(state) == ["current", "next"]
    assert state.current.activated_at == clock.now
    assert state.next is not None and state.next.activated_at is None


def test_scheduled_rotation_promotes_the_prepublished_next() -> None:
    clock, mint, state = fresh()
    upcoming = state.next
    assert upcoming is not None
    assert lifecycle.reconcile(state, clock.now + 99, POLICY, mint) is None
    clock.advance(100)
    transition = lifecycle.reconcile(state, clock.now, POLICY, mint)
    assert transition is not None
    rotated = transition.state
    assert rotated.version == 2
    assert rotated.current.kid == upcoming.kid
    assert statuses(rotated) == ["current", "next", "retired"]
    retired = rotated.by_status(Status.RETIRED)[0]
    assert retired.kid == state.current.kid
    assert retired.expires_at == clock.now + POLICY.overlap
    assert [e.kind for e in transition.events] == ["rotate"]


def test_reconcile_is_idempotent_at_the_same_instant() -> None:
    clock, mint, state = fresh()
    clock.advance(100)
    transition = lifecycle.reconcile(state, clock.now, POLICY, mint)
    assert transition is not None
    assert lifecycle.reconcile(transition.state, clock.now, POLICY, mint) is None


def test_a_daemon_down_for_many_intervals_rotates_once() -> None:
    clock, mint, state = fresh()
    clock.advance(POLICY.interval * 3 + 7)  # type: ignore[operator]
    transition = lifecycle.reconcile(state, clock.now, POLICY, mint)
    assert transition is not None
    assert [e.kind for e in transition.events].count("rotate") == 1
    assert lifecycle.reconcile(transition.state, clock.now, POLICY, mint) is None


def test_retired_keys_expire_after_overlap_and_not_before() -> None:
    clock, mint, state = fresh()
    clock.advance(100)
    t = lifecycle.reconcile(state, clock.now, POLICY, mint)
    assert t is not None
    retired = t.state.by_status(Status.RETIRED)[0]
    assert lifecycle.reconcile(t.state, clock.now + 59.9, POLICY, mint) is None
    expired = lifecycle.reconcile(t.state, clock.now + 60, POLICY, mint)
    assert expired is not None
    assert expired.state.find(retired.kid) is None
    assert [e.kind for e in expired.events] == ["expire"]


def test_jwks_order_is_current_next_then_retired_newest_first() -> None:
    clock, mint, state = fresh()
    policy = replace(POLICY, overlap=1000.0)
    retired_order: list[str] = []
    for _ in range(3):
        retired_order.insert(0, state.current.kid)
        clock.advance(100)
        t = lifecycle.reconcile(state, clock.now, policy, mint)
        assert t is not None
        state = t.state
    kids = [k["kid"] for k in json.loads(state.jwks())["keys"]]
    assert kids[0] == state.current.kid
    assert state.next is not None and kids[1] == state.next.kid
    assert kids[2:] == retired_order


def test_manual_rotation_refuses_a_next_key_younger_than_cache_max_age() -> None:
    clock, mint, state = fresh()
    clock.advance(19)
    with pytest.raises(RotationTooSoon, match="cache_max_age"):
        lifecycle.rotate(state, clock.now, POLICY, mint)
    forced = lifecycle.rotate(state, clock.now, POLICY, mint, force=True)
    assert state.next is not None and forced.state.current.kid == state.next.kid
    clock.advance(1)
    assert lifecycle.rotate(state, clock.now, POLICY, mint).state.current.kid == state.next.kid


def test_scheduled_rotation_waits_for_a_young_next_key() -> None:
    clock, mint, state = fresh()
    clock.advance(95)
    revoked = lifecycle.revoke(state, state.next.kid, clock.now, POLICY, mint)  # type: ignore[union-attr]
    clock.advance(5)  # interval elapsed, but the new next is only 5 s old
    assert lifecycle.reconcile(revoked.state, clock.now, POLICY, mint) is None
    assert lifecycle.rotation_due_at(revoked.state, POLICY) == clock.now + 15


def test_force_new_signs_with_a_fresh_key_and_drops_the_old_next() -> None:
    clock, mint, state = fresh()
    old_next = state.next
    assert old_next is not None
    t = lifecycle.rotate(state, clock.now + 1, POLICY, mint, force_new=True)
    kids = {k.kid for k in t.state.keys}
    assert old_next.kid not in kids
    assert t.state.current.kid not in {k.kid for k in state.keys}
    assert t.state.find(state.current.kid) is not None  # retired, still verifying
    assert statuses(t.state) == ["current", "next", "retired"]


def test_revoking_current_promotes_next_at_once_and_mints_a_new_next() -> None:
    clock, mint, state = fresh()
    old_current, old_next = state.current, state.next
    assert old_next is not None
    t = lifecycle.revoke(state, old_current.kid, clock.now + 1, POLICY, mint)
    assert t.state.find(old_current.kid) is None
    assert t.state.current.kid == old_next.kid
    assert t.state.next is not None and t.state.next.kid not in {old_current.kid, old_next.kid}
    with pytest.raises(NoSuchKey):
        lifecycle.revoke(t.state, old_current.kid, clock.now + 2, POLICY, mint)


def test_reconcile_mints_a_missing_next_key() -> None:
    clock, mint, state = fresh()
    without_next = KeySetState(state.keyset, state.version, state.updated_at, (state.current,))
    t = lifecycle.reconcile(without_next, clock.now, POLICY, mint)
    assert t is not None
    assert [e.kind for e in t.events] == ["repair"]
    assert t.state.next is not None


def test_cron_schedule_rotates_at_the_fire_time() -> None:
    policy = Policy(
        interval=None, schedule="0 * * * *", overlap=7200.0, cache_max_age=300.0, jitter=0.0
    )
    mint = RecordingMint(make_keyring("k1"))
    start = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    state = lifecycle.bootstrap("default", start, mint).state
    due = lifecycle.rotation_due_at(state, policy)
    assert due == 1_800_003_600.0
    assert lifecycle.reconcile(state, due - 1, policy, mint) is None
    assert lifecycle.reconcile(state, due, policy, mint) is not None


def test_jitter_spreads_keysets_created_together_and_only_delays() -> None:
    policy = replace(POLICY, jitter=60.0)
    mint = RecordingMint(make_keyring("k1"))
    start = 1_800_000_000.0
    dues = []
    for index in range(300):
        state = lifecycle.bootstrap(f"app-{index}", start, mint).state
        due = lifecycle.rotation_due_at(state, policy)
        assert start + 100 <= due < start + 160
        assert lifecycle.rotation_due_at(state, policy) == due  # a function of the state alone
        assert lifecycle.reconcile(state, due - 0.001, policy, mint) is None
        assert lifecycle.reconcile(state, due, policy, mint) is not None
        dues.append(due)
    # 300 key sets made in the same second fall due across the whole window, not together
    assert max(dues) - min(dues) > 45
    assert len({int(d) for d in dues}) > 40


def test_default_jitter_is_a_share_of_the_period_capped_at_an_hour() -> None:
    assert Policy().jitter_window == 3600.0  # 24h interval: 5 % is 72 min, capped
    assert Policy(interval=1000.0, cache_max_age=10.0).jitter_window == 50.0
    assert Policy(interval=None, schedule="0 3 * * *").jitter_window == 3600.0
    assert replace(POLICY, jitter=100.0).problems() == [
        ("jitter", "must be at least 0 and less than the period (1m40s)")
    ]


WEEKDAYS = Policy(interval=None, schedule="0 0 * * mon-fri", overlap=7200.0)
THURSDAY = datetime(2027, 1, 14, tzinfo=UTC).timestamp()  # 00:00, a fire time
DAY = 86400.0


def test_the_rotation_period_of_an_interval_is_the_interval() -> None:
    assert POLICY.rotation_period(1_800_000_000.0) == 100.0
    assert Policy().rotation_period(0.0) == DAY


@pytest.mark.parametrize(
    ("activated", "period"),
    [
        (THURSDAY + 30, DAY),  # rotated on schedule (and jitter): replaced on Friday
        (THURSDAY + DAY + 30, 3 * DAY),  # Friday's key signs over the weekend
        (THURSDAY + 15 * 3600, DAY),  # rotated by hand on Thursday afternoon: the gap, not 9h
        (THURSDAY + DAY - 120, 3 * DAY),  # too close to Friday's fire (cache_max_age 5m)
    ],
)
def test_the_rotation_period_of_a_schedule_is_the_gap_its_rotation_closes(
    activated: float, period: float
) -> None:
    assert WEEKDAYS.rotation_period(activated) == period


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["0 0 * * mon-fri", "0 */6 * * *", "30 2 1 * *", "0 0,1 * * *", "*/5 * * * *"]),
    st.floats(min_value=1_800_000_000.0, max_value=1_900_000_000.0),
)
def test_no_key_outlives_one_and_a_half_rotation_periods(schedule: str, activated: float) -> None:
    """What the key age alert relies on: under the default jitter a key is replaced before
    it is 1.5 rotation periods old, whenever it was activated (on schedule or by hand) and
    whatever its kid's share of the jitter window."""
    policy = Policy(interval=None, schedule=schedule, overlap=7200.0, cache_max_age=60.0)
    state = lifecycle.bootstrap("default", activated, RecordingMint(make_keyring("k1"))).state
    latest = policy.next_rotation_after(activated) + policy.jitter_window
    assert lifecycle.rotation_due_at(state, policy) <= latest
    assert latest - activated <= 1.5 * policy.rotation_period(activated)


def test_an_algorithm_change_signs_only_through_the_prepublished_next() -> None:
    clock, mint, state = fresh()
    old_current, old_next = state.current, state.next
    assert old_next is not None and old_current.algorithm == "ES256"
    rsa = replace(POLICY, algorithm="RS256", rsa_bits=2048)
    # Nothing is due: the policy change alone mints nothing and re-keys nothing.
    assert lifecycle.reconcile(state, clock.now + 1, rsa, mint) is None
    clock.advance(100)
    rotated = lifecycle.reconcile(state, clock.now, rsa, mint)
    assert rotated is not None
    state = rotated.state
    # The ES256 next, published a whole interval ago, signs; the old current verifies on.
    assert (state.current.kid, state.current.algorithm) == (old_next.kid, "ES256")
    assert state.find(old_current.kid) is not None
    upcoming = state.next
    assert upcoming is not None and upcoming.algorithm == "RS256"
    assert json.loads(upcoming.publishable())["kty"] == "RSA"
    clock.advance(100)
    again = lifecycle.reconcile(state, clock.now, rsa, mint)
    assert again is not None
    assert (again.state.current.kid, again.state.current.algorithm) == (upcoming.kid, "RS256")
    retired = {k.kid: k.algorithm for k in again.state.by_status(Status.RETIRED)}
    assert retired[old_next.kid] == "ES256"
    assert decode_state(encode_state(again.state), "default") == again.state


@pytest.mark.parametrize("algorithm", ["ES384", "EdDSA"])
def test_bootstrap_mints_keys_of_the_policy_algorithm(algorithm: str) -> None:
    policy = replace(POLICY, algorithm=algorithm)
    state = lifecycle.bootstrap("default", 0.0, RecordingMint(make_keyring()), policy).state
    assert [k.algorithm for k in state.keys] == [algorithm, algorithm]


class LifecycleMachine(RuleBasedStateMachine):
    """Drives every transition with a fake clock and checks the design's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.mint = RecordingMint(make_keyring("k1"), deterministic=True)
        self.state = lifecycle.bootstrap("default", self.clock.now, self.mint).state
        self.published_at = {k.kid: self.clock.now for k in self.state.keys}
        self.stopped_signing: dict[str, float] = {}
        self.revoked: set[str] = set()
        # RS256 is left to a unit test: minting RSA keys at every step would slow the machine.
        self.policy = JITTERED
        self.algorithm_of = {k.kid: k.algorithm for k in self.state.keys}
        # kid -> the end time the operator gave when importing it
        self.imported_until: dict[str, float] = {}
        self.imports = 0
        # kids of the keys adopted from another IAM (minted there, in its algorithm)
        self.adopted: set[str] = set()

    def apply(self, transition: Transition, *, fresh_signer_allowed: bool = False) -> None:
        before, after, now = self.state, transition.state, self.clock.now
        # 5. each commit raises the version by one
        assert after.version == before.version + 1
        assert after.updated_at == now
        # 3. a key signs only after it was published (force_new is the stated exception)
        if after.current.kid != before.current.kid:
            self.stopped_signing[before.current.kid] = now
            if not fresh_signer_allowed:
                assert before.find(after.current.kid) is not None
                scheduled = any(e.reason == "scheduled" for e in transition.events)
                if scheduled:
                    assert now - self.published_at[after.current.kid] >= self.policy.cache_max_age
                    # jitter only ever delays a scheduled rotation
                    activated = before.current.activated_at or before.updated_at
                    assert now >= activated + (JITTERED.interval or 0)
        # 4. a retired key stays published for overlap after it stopped signing
        revoked_now = {e.kid for e in transition.events if e.kind == "revoke"}
        self.revoked |= revoked_now
        for key in before.keys:
            if after.find(key.kid) is None and key.kid not in revoked_now:
                if key.kid in self.imported_until:
                    # 6. an imported key leaves at its end time, not before
                    assert now >= self.imported_until[key.kid]
                    continue
                assert key.status is Status.RETIRED
                assert now >= self.stopped_signing[key.kid] + JITTERED.overlap
        for key in after.keys:
            self.published_at.setdefault(key.kid, now)
            assert key.kid not in self.revoked
            # 6. a key minted now has the policy's algorithm, and a key keeps its algorithm
            #    for life (so an algorithm change signs only through a pre-published next)
            foreign = key.kid in self.imported_until or key.kid in self.adopted
            if before.find(key.kid) is None and not foreign:
                assert key.algorithm == self.policy.algorithm
            assert self.algorithm_of.setdefault(key.kid, key.algorithm) == key.algorithm
            if key.kid in self.imported_until:
                # 6. an imported key never signs, never becomes current or next, and is
                # due to leave exactly when the operator wrote
                assert key.status is Status.IMPORTED
                assert key.sealed is None
                assert key.expires_at == self.imported_until[key.kid]
        self.state = after

    @rule(algorithm=st.sampled_from(["ES256", "ES384", "EdDSA"]))
    def change_algorithm(self, algorithm: str) -> None:
        self.policy = replace(JITTERED, algorithm=algorithm)

    @rule(seconds=st.integers(min_value=0, max_value=250))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule()
    def reconcile(self) -> None:
        transition = lifecycle.reconcile(self.state, self.clock.now, self.policy, self.mint)
        if transition is not None:
            self.apply(transition)
        assert lifecycle.reconcile(self.state, self.clock.now, self.policy, self.mint) is None
        # 6. once reconciled, no imported key is published past its end time
        for key in self.state.by_status(Status.IMPORTED):
            assert self.clock.now < self.imported_until[key.kid]

    @rule(force=st.booleans())
    def rotate(self, force: bool) -> None:
        upcoming = self.state.next
        assert upcoming is not None
        young = self.clock.now - upcoming.created_at < JITTERED.cache_max_age
        try:
            transition = lifecycle.rotate(
                self.state, self.clock.now, self.policy, self.mint, force=force
            )
        except RotationTooSoon:
            assert young and not force
            return
        assert force or not young
        self.apply(transition)

    @rule()
    def rotate_force_new(self) -> None:
        transition = lifecycle.rotate(
            self.state, self.clock.now, self.policy, self.mint, force_new=True
        )
        self.apply(transition, fresh_signer_allowed=True)

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        kid = data.draw(st.sampled_from([k.kid for k in self.state.keys]))
        self.apply(lifecycle.revoke(self.state, kid, self.clock.now, self.policy, self.mint))

    @rule(lifetime=st.integers(min_value=1, max_value=400), count=st.integers(1, 2))
    def import_foreign_keys(self, lifetime: int, count: int) -> None:
        jwks = []
        for _ in range(count):
            self.imports += 1
            jwks.append({**foreign_jwk(self.imports), "kid": f"iam-{self.imports}"})
        until = self.clock.now + lifetime
        transition = lifecycle.import_verify_only(
            "default", self.state, jwks, until, self.clock.now, policy=self.policy, mint=self.mint
        )
        for jwk in jwks:
            self.imported_until[jwk["kid"]] = until
        self.apply(transition)

    @rule(as_current=st.booleans())
    def adopt_a_signing_key(self, as_current: bool) -> None:
        self.imports += 1
        private = ec.derive_private_key(50_000 + self.imports, ec.SECP256R1())
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        jwk = {**public_jwk(private.public_key()), "kid": f"adopted-{self.imports}"}
        key = GeneratedKey(jwk=jwk, private_der=der)
        self.mint.made.append(key)  # where the invariants look for private material
        self.adopted.add(key.kid)
        sealed = self.mint.keyring.seal(der, keyset="default", kid=key.kid)
        transition = lifecycle.adopt_signing_key(
            "default",
            self.state,
            (key, sealed),
            self.clock.now,
            self.policy,
            as_current=as_current,
            mint=self.mint,
        )
        # --as current is the stated exception to "published before it signs"
        self.apply(transition, fresh_signer_allowed=as_current)
        adopted = self.state.find(key.kid)
        assert adopted is not None and adopted.sealed is not None
        assert adopted.status is (Status.CURRENT if as_current else Status.NEXT)

    @rule(data=st.data())
    def import_a_kid_already_held(self, data: st.DataObject) -> None:
        kid = data.draw(st.sampled_from([k.kid for k in self.state.keys]))
        jwk = {**foreign_jwk(10_000), "kid": kid}
        with pytest.raises(KidTaken):
            lifecycle.import_verify_only(
                "default",
                self.state,
                [jwk],
                self.clock.now + 10,
                self.clock.now,
                policy=self.policy,
                mint=self.mint,
            )

    @invariant()
    def exactly_one_current_and_one_next(self) -> None:
        # 2. after bootstrap there is exactly one current
        assert [k.status for k in self.state.keys].count(Status.CURRENT) == 1
        assert [k.status for k in self.state.keys].count(Status.NEXT) == 1

    @invariant()
    def no_private_material_in_jwks_or_state(self) -> None:
        # 1. no private member in the JWKS, none in plaintext in the stored state
        for jwk in json.loads(self.state.jwks())["keys"]:
            assert not PRIVATE_MEMBERS & jwk.keys()
            assert set(jwk) == {"alg", "kid", "use", *THUMBPRINT_MEMBERS[jwk["kty"]]}
        stored = encode_state(self.state)
        made = {k.kid: k.private_der for k in self.mint.made}
        for key in self.state.keys:
            if key.status is Status.IMPORTED:
                continue  # nothing of it was ever held
            der = made[key.kid]
            assert der not in stored
            assert base64.b64encode(der) not in stored
            assert base64.urlsafe_b64encode(der).rstrip(b"=") not in stored

    @invariant()
    def stored_form_round_trips(self) -> None:
        assert decode_state(encode_state(self.state), "default") == self.state


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
