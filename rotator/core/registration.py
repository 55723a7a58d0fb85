"""The rules a key set of the registry passes to be added or to have its policy updated,
whoever asks (`rotator keyset add` and ``update`` now; the daemon or an API could too):
the policy given is laid over the entry's and checked (`merged_overrides`, over
`stored_overrides` for an update), and the issuer path it makes is the key set's own
(`check_issuer_path`); a name already registered is added again only with the policy
it has (`check_addable`).

Pure: values in, `PolicyOverrides` or `Refused` out. `Refused` names the field of each
problem, so that each caller names the fields its own way (the CLI by their flags).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from rotator.core.entry import BadPolicy, parse_overrides, policy_of
from rotator.core.issuer import issuer_routes
from rotator.core.overrides import PolicyOverrides, field_error
from rotator.core.policy import Policy

__all__ = [
    "Refused",
    "check_addable",
    "check_issuer_path",
    "merged_overrides",
    "stored_overrides",
]


class Refused(ValueError):
    """What the rules do not allow: `problems`, ``(field, message)`` pairs (the field
    ``""`` for a problem of no one field)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in self.problems))


def merged_overrides(
    stored: Mapping[str, Any], given: Mapping[str, Any], base: Policy | None = None
) -> PolicyOverrides:
    """The fields *given* laid over the *stored* overrides, validated; with *base*, the
    policy they make over it is checked too. A trigger given (interval or schedule)
    replaces the stored one, since a key set has one."""
    merged = dict(stored)
    if {"interval", "schedule"} & given.keys():
        merged.pop("interval", None)
        merged.pop("schedule", None)
    merged.update(given)
    try:
        overrides = PolicyOverrides.model_validate(merged)
    except ValidationError as exc:
        raise Refused([field_error(e) for e in exc.errors()]) from None
    problems = overrides.overlay(base).problems() if base is not None else []
    if problems:
        raise Refused(problems)
    return overrides


def stored_overrides(entry: str, base: Policy) -> dict[str, Any]:
    """The overrides of the registry *entry* that an update lays its fields over; none for
    an entry that no longer parses over *base*, which the update replaces."""
    try:
        overrides, _policy = parse_overrides(entry, base)
    except BadPolicy:
        return {}
    return overrides.model_dump(mode="json", exclude_none=True)


def check_addable(name: str, policy: str, registered: Mapping[str, str]) -> None:
    """Refuse to add *name* with *policy* (its overrides' encoding) when *registered*
    (name -> entry, tombstones left out) holds it with another policy: adding is not how
    a policy changes. The same policy is allowed (an add run twice)."""
    entry = registered.get(name)
    if entry is not None and policy_of(entry) != policy:
        raise Refused(
            [
                (
                    "",
                    f"key set {name} is already registered with policy {policy_of(entry)}; "
                    f"change it with `rotator keyset update {name}`",
                )
            ]
        )


def check_issuer_path(
    issuers: Mapping[str, str | None], name: str, overrides: PolicyOverrides, base: Policy
) -> None:
    """Refuse *overrides* for *name* if the issuer path they give it (or it inherits from
    *base*) is another key set's in *issuers* (name -> issuer, as the config and the
    registry say now): serve could not tell whose discovery document it is."""
    claims = {**issuers, name: overrides.overlay(base).issuer}
    _routes, shared = issuer_routes(claims)
    for path, claimants in shared.items():
        if name in claimants:
            others = ", ".join(n for n in claimants if n != name)
            inherited = "" if overrides.issuer else " (inherited from [rotation].issuer)"
            raise Refused(
                [
                    (
                        "issuer",
                        f"issuer path {path}{inherited} is already key set {others}'s; "
                        "give this key set an issuer of its own",
                    )
                ]
            )
