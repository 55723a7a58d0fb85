"""Hostile variants of real documents: each value at each JSON path replaced by each hostile
value, each member deleted and duplicated, and hostile bytes for whole documents."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from rotator.core import lifecycle
from rotator.core.envelope import Keyring
from rotator.core.policy import Policy
from rotator.core.state import KeySetState, Status
from tests.helpers import RecordingMint

Path = tuple[str | int, ...]

NOW = 1_800_000_000.0
_BUILD = Policy(
    interval=100.0, overlap=1000.0, max_token_ttl=30.0, clock_skew=5.0, cache_max_age=20.0
)


def real_state(
    keyring: Keyring, keyset: str = "default", algorithms: tuple[str, ...] = ("ES256",) * 4
) -> KeySetState:
    """A state as the code makes it: bootstrapped, rotated three times, a key revoked (so
    it holds a current, a next and two retired keys), sealed under *keyring*. The policy's
    algorithm is ``algorithms[0]`` at bootstrap and ``algorithms[step]`` at each rotation,
    so four different ones leave a key of each in the state."""
    mint = RecordingMint(keyring, keyset=keyset)
    policies = [replace(_BUILD, algorithm=algorithm, rsa_bits=2048) for algorithm in algorithms]
    state = lifecycle.bootstrap(keyset, NOW, mint, policies[0]).state
    for step in (1, 2, 3):
        transition = lifecycle.reconcile(state, NOW + 150 * step, policies[step], mint)
        assert transition is not None
        state = transition.state
    retired = state.by_status(Status.RETIRED)[-1].kid  # the oldest: a bootstrap key
    return lifecycle.revoke(state, retired, NOW + 500, policies[3], mint).state


@dataclass(frozen=True)
class Raw:
    """JSON text put in as it is (what `json.dumps` would never write)."""

    text: bytes


@dataclass(frozen=True)
class Pairs:
    """An object whose members may repeat."""

    items: tuple[tuple[str, Any], ...]


DEEP = Raw(b"[" * 10_000 + b"]" * 10_000)
DEEP_OBJECT = Raw(b'{"a":' * 10_000 + b"1" + b"}" * 10_000)

#: Values an attacker (or a bit flip, or a careless operator) puts where a value belongs.
HOSTILE: dict[str, Any] = {
    "null": None,
    "true": True,
    "false": False,
    "zero": 0,
    "negative": -1,
    "fraction": 1.5,
    "huge int": 10**400,
    "huge negative int": -(10**400),
    "1e300": 1e300,
    "-1e300": -1e300,
    "NaN": Raw(b"NaN"),
    "Infinity": Raw(b"Infinity"),
    "-Infinity": Raw(b"-Infinity"),
    "1e400": Raw(b"1e400"),
    "5000 digits": Raw(b"9" * 5000),
    "empty string": "",
    "string": "x",
    "lone surrogate": "\udcff",
    "control characters": "\x1b[31m\n",
    "not UTF-8": Raw(b'"\xff\xfe"'),
    "long string": "A" * 100_000,
    "empty list": [],
    "list": [1],
    "empty object": {},
    "object": {"a": 1},
    "deep list": DEEP,
    "deep object": DEEP_OBJECT,
    "bad base64": "!!!!",
    "bad padding": "AAA",
    "base64 of 11 bytes": base64.b64encode(bytes(11)).decode(),
    "base64 of 13 bytes": base64.b64encode(bytes(13)).decode(),
    "base64url of 31 bytes": base64.urlsafe_b64encode(bytes(31)).rstrip(b"=").decode(),
    "base64url of 33 bytes": base64.urlsafe_b64encode(bytes(33)).rstrip(b"=").decode(),
}

#: Registry entries from issue 12 that made the daemon rotate nothing at all.
BAD_ENTRIES: dict[str, bytes] = {
    "not-utf8": b"\xff{}",
    "cron-that-never-fires": b'{"schedule": "0 0 30 2 *"}',
    "400-digit-duration": b'{"interval": ' + b"9" * 400 + b"}",
    "400-digit-duration-text": b'{"overlap": "' + b"9" * 400 + b's"}',
    "nested-10000-deep": b'{"interval": ' + DEEP.text + b"}",
}

#: Whole documents that are not documents.
HOSTILE_BYTES: dict[str, bytes] = {
    "empty": b"",
    "not UTF-8": b"\xff{}",
    "UTF-16": json.dumps({"a": 1}).encode("utf-16"),
    "BOM": b"\xef\xbb\xbf{}",
    "NUL": b"\x00",
    "deep list": DEEP.text,
    "deep object": DEEP_OBJECT.text,
    "NaN": b"NaN",
    "huge int": b"9" * 401,
    "a string": b'"x"',
    "a list": b"[]",
}


def emit(value: Any) -> bytes:
    """*value* as JSON text, with `Raw` and `Pairs` written as they say."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        value = Pairs(tuple(value.items()))
    if isinstance(value, Pairs):
        members = (json.dumps(name).encode() + b":" + emit(item) for name, item in value.items)
        return b"{" + b",".join(members) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(emit(item) for item in value) + b"]"
    return json.dumps(value).encode()


def paths(document: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every path in *document*, the root first."""
    yield prefix
    if isinstance(document, dict):
        for name, value in document.items():
            yield from paths(value, (*prefix, name))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from paths(value, (*prefix, index))


def _replace(document: Any, path: Path, make: Any) -> Any:
    """A copy of *document* with the value at *path* replaced by ``make(old value)``."""
    if not path:
        return make(document)
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        return {k: _replace(v, rest, make) if k == head else v for k, v in document.items()}
    return [_replace(v, rest, make) if i == head else v for i, v in enumerate(document)]


_GONE = object()


def _without(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not _GONE}
    return [v for v in value if v is not _GONE]


def variants(document: Any) -> Iterator[tuple[str, bytes]]:
    """``(what was done, bytes)`` for each hostile variant of *document*."""
    for path in paths(document):
        where = "/".join(map(str, path)) or "(root)"
        for label, value in HOSTILE.items():
            yield f"{where} = {label}", emit(_replace(document, path, lambda _old, v=value: v))
        if not path:
            continue
        parent, last = path[:-1], path[-1]
        removed = _replace(document, path, lambda _old: _GONE)
        yield f"{where} deleted", emit(_replace(removed, parent, _without))
        if isinstance(last, str):
            for label, second in (("the same", None), ("another", "x")):

                def twice(obj: dict[str, Any], name: str = last, other: Any = second) -> Pairs:
                    items = list(obj.items())
                    at = next(i for i, (k, _v) in enumerate(items) if k == name)
                    repeat = obj[name] if other is None else other
                    return Pairs((*items[: at + 1], (name, repeat), *items[at + 1 :]))

                yield f"{where} twice, {label} value", emit(_replace(document, parent, twice))
    text = emit(document)
    for label, raw in HOSTILE_BYTES.items():
        yield f"document: {label}", raw
    for cut in (1, len(text) // 2, len(text) - 1):
        yield f"document cut at {cut}", text[:cut]
