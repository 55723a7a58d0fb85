"""The keyset rules a registration or an update passes (`rotator.core.registration`),
as values: what they refuse names the field, for any caller to name its own way."""

from __future__ import annotations

import pytest

from rotator.core.entry import encode_entry, encode_overrides
from rotator.core.overrides import PolicyOverrides
from rotator.core.policy import Policy
from rotator.core.registration import (
    Refused,
    check_addable,
    check_issuer_path,
    merged_overrides,
    stored_overrides,
)

BASE = Policy()


def test_a_trigger_given_replaces_the_stored_one_and_keeps_the_rest() -> None:
    stored = {"interval": "6h", "overlap": "2h"}
    merged = merged_overrides(stored, {"schedule": "0 3 * * *"}, BASE)
    assert (merged.interval, merged.schedule, merged.overlap) == (None, "0 3 * * *", 7200.0)
    assert merged_overrides(stored, {"jitter": "5m"}).interval == 21600.0


def test_what_is_refused_names_its_field() -> None:
    with pytest.raises(Refused) as bad_value:
        merged_overrides({}, {"overlap": "abc"})
    assert [field for field, _message in bad_value.value.problems] == ["overlap"]
    # Sound alone, unsound over the base (a cache longer than half the interval): refused
    # only when the base is given.
    given = {"interval": "10m", "cache_max_age": "6m"}
    assert merged_overrides({}, given).cache_max_age == 360.0
    with pytest.raises(Refused) as contradiction:
        merged_overrides({}, given, BASE)
    assert [field for field, _message in contradiction.value.problems] == ["cache_max_age"]


def test_an_update_replaces_a_stored_entry_that_no_longer_parses() -> None:
    entry = encode_entry(PolicyOverrides.model_validate({"interval": "6h"}), "9f2c")
    assert stored_overrides(entry, BASE) == {"interval": "6h"}
    assert stored_overrides('{"interval": "never"}', BASE) == {}


def test_an_issuer_path_is_one_key_set_s_own() -> None:
    issuers = {"a": "https://iam.example/tenants/a", "b": None}
    own = PolicyOverrides.model_validate({"issuer": "https://other.example/tenants/b"})
    check_issuer_path(issuers, "b", own, BASE)
    # A key set's own claim, as the registry holds it, is not another's.
    check_issuer_path(issuers, "a", PolicyOverrides(), Policy(issuer=issuers["a"]))
    taken = PolicyOverrides.model_validate({"issuer": "https://other.example/tenants/a/"})
    with pytest.raises(Refused) as refused:
        check_issuer_path(issuers, "b", taken, BASE)
    assert refused.value.problems == [
        (
            "issuer",
            "issuer path /tenants/a is already key set a's; give this key set an issuer of its own",
        )
    ]
    with pytest.raises(Refused, match=r"\(inherited from \[rotation\]\.issuer\)"):
        check_issuer_path(issuers, "b", PolicyOverrides(), Policy(issuer=issuers["a"]))


def test_a_name_is_added_again_only_with_the_policy_it_has() -> None:
    six_hours = PolicyOverrides.model_validate({"interval": "6h"})
    registered = {"billing": encode_entry(six_hours, "lineage-1")}
    # The same policy (an add run twice) and a name not registered pass.
    check_addable("billing", encode_overrides(six_hours), registered)
    check_addable("orders", encode_overrides(PolicyOverrides()), registered)
    with pytest.raises(Refused) as other:
        check_addable(
            "billing",
            encode_overrides(PolicyOverrides.model_validate({"interval": "1h"})),
            registered,
        )
    ((field, message),) = other.value.problems
    assert field == ""
    assert message == (
        'key set billing is already registered with policy {"interval": "6h"}; '
        "change it with `rotator keyset update billing`"
    )
