"""Policy overrides: the fields a ``[rotation]`` table, a ``[keysets.NAME]`` table or a
registry entry may set, each laid over a base `Policy`.

It lives in the core, below both the config and the registry, so that the registry can
validate a stored entry without importing the config (and its pydantic-settings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from rotator.core.durations import format_duration, parse_duration
from rotator.core.issuer import validate_issuer
from rotator.core.jwk import MAX_RSA_BITS, MIN_RSA_BITS, Algorithm
from rotator.core.policy import Policy, parse_schedule

__all__ = ["Duration", "PolicyOverrides", "Whole", "describe_error", "field_error"]

#: A duration field: ``"90s"``, ``"6h"``, ``"1d12h"`` or seconds; dumped as text.
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]


def _not_true_or_false(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("a whole number, not true or false")
    return value


#: A whole-number field (a count, a port, a size). pydantic's lax mode reads ``true`` as 1
#: (``shards = true`` was one shard): a boolean there is a mistake, refused. Text stays
#: accepted (``"80"``), since every environment variable is text.
Whole = Annotated[int, BeforeValidator(_not_true_or_false)]


class PolicyOverrides(BaseModel):
    """The policy fields set here (``None``: not set, the base applies)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: Duration | None = None
    schedule: str | None = None
    overlap: Duration | None = None
    max_token_ttl: Duration | None = None
    clock_skew: Duration | None = None
    cache_max_age: Duration | None = None
    jitter: Duration | None = None
    algorithm: Algorithm | None = None
    rsa_bits: Annotated[Whole, Field(ge=MIN_RSA_BITS, le=MAX_RSA_BITS)] | None = None
    issuer: str | None = None

    @field_validator("issuer")
    @classmethod
    def _good_issuer(cls, issuer: str | None) -> str | None:
        return None if issuer is None else validate_issuer(issuer)

    @field_validator("schedule")
    @classmethod
    def _parse_cron(cls, schedule: str | None) -> str | None:
        if schedule is not None:
            try:
                parse_schedule(schedule)
            except ValueError as exc:
                raise ValueError(f"invalid cron expression {schedule!r}: {exc}") from None
        return schedule

    @model_validator(mode="after")
    def _one_trigger(self) -> PolicyOverrides:
        if self.interval is not None and self.schedule is not None:
            raise ValueError("set either interval or schedule, not both")
        return self

    def overlay(self, base: Policy) -> Policy:
        """*base* with every field set here replacing it (interval and schedule together:
        setting one unsets the other)."""
        values: dict[str, Any] = {
            name: value
            for name in type(self).model_fields
            if (value := getattr(self, name)) is not None
        }
        if self.interval is not None or self.schedule is not None:
            values["interval"], values["schedule"] = self.interval, self.schedule
        return dataclasses.replace(base, **values)


def field_error(error: Mapping[str, Any]) -> tuple[str, str]:
    """The field a pydantic error names (``""`` for none: the model as a whole) and its
    message."""
    location = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field (check the spelling)"
    return location, message


def describe_error(error: Mapping[str, Any]) -> str:
    """One line naming the field of a pydantic error."""
    location, message = field_error(error)
    return f"{location}: {message}" if location else message
