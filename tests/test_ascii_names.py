"""Issue 14: key set names are ASCII at every entry point. A name like ``café`` used to be
accepted and then could never be asked for through ``X-App-Name`` (HTTP header bytes are
taken as latin-1), so each entry point now refuses it with the one rule,
`validate_keyset_name`. The HTTP entry points are tested in tests/test_server.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from rotator.core.envelope import Keyring
from rotator.embedded import EmbeddedRedis
from rotator.library.aioreader import AsyncJWKSReader
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.storage.layout import validate_keyset_name
from tests.conftest import Cli

NAME = "café"
WHY = "key set name 'café' contains 'é': key set names are ASCII"


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("name", [NAME, "ünïcode", "名前", "a\u00a0b", "Ã©"])
def test_the_rule_refuses_any_non_ascii_name(name: str) -> None:
    with pytest.raises(ValueError, match="key set names are ASCII"):
        validate_keyset_name(name)


def test_a_config_table_with_a_non_ascii_name_exits_2_naming_it(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "rotator.toml"
    config.write_text(f'[keysets."{NAME}"]\ncache_max_age = "10s"\n', encoding="utf-8")
    result = cli("--config", str(config), "check-config")
    assert result.code == 2
    assert _one_line(result.stderr) == f"rotator: keysets: {WHY}"


def test_keyset_add_of_a_non_ascii_name_exits_2_and_writes_nothing(
    cli: Cli, client: redis.Redis
) -> None:
    result = cli("keyset", "add", NAME, "--cache-max-age", "10s")
    assert result.code == 2 and WHY in _one_line(result.stderr)
    assert not client.exists("rotator:keysets")


@pytest.mark.parametrize(
    "command", [("rotate", "--keyset", NAME), ("jwks", "--keyset", NAME)], ids=lambda c: c[0]
)
def test_a_non_ascii_keyset_argument_exits_2(cli: Cli, command: tuple[str, ...]) -> None:
    result = cli(*command)
    assert result.code == 2 and WHY in _one_line(result.stderr)


def test_a_non_ascii_registry_entry_read_back_is_listed_invalid_and_never_managed(
    cli: Cli, client: redis.Redis
) -> None:
    """An entry written before this rule, or by hand."""
    client.hset("rotator:keysets", NAME, "{}")
    listing = cli("keyset", "list")
    assert listing.code == 1
    (line,) = [line for line in listing.stdout.splitlines() if "invalid name" in line]
    assert line.startswith("'café' (invalid name)") and "ASCII" in line
    assert not client.exists(f"rotator:{{{NAME}}}:jwks")


def test_the_library_refuses_a_non_ascii_name(
    redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    with pytest.raises(ValueError, match=WHY):
        JWKSReader(redis_server.url, NAME)
    with pytest.raises(ValueError, match=WHY):
        AsyncJWKSReader(redis_server.url, NAME)
    with pytest.raises(ValueError, match=WHY):
        Signer(redis_server.url, keyring, NAME, max_token_ttl=60)
