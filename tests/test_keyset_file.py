"""`rotator keyset add --from-file`: many key sets registered and bootstrapped in batches,
and a hostile file refused with one line naming the line at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from rotator.cli import keyset_file
from rotator.cli.common import UsageError
from rotator.core.entry import lineage_of
from tests.conftest import Cli


def test_every_name_of_the_file_is_registered_and_bootstrapped(
    cli: Cli, client: redis.Redis, tmp_path: Path
) -> None:
    names = [f"tenant-{index:04d}" for index in range(1200)]  # more than two batches
    path = tmp_path / "names.txt"
    path.write_text("\n".join([*names[:600], "", names[0], *names[600:]]) + "\n")
    added = cli("keyset", "add", "--from-file", str(path), "--interval", "50s")
    assert added.code == 0, added.stderr
    assert "1200 key set(s): 1200 added, 0 already registered" in added.stdout
    assert all(client.exists(f"rotator:{{{name}}}:jwks") for name in names)
    lineages = {lineage_of(client.hget("rotator:keysets", n).decode()) for n in names[:50]}  # type: ignore[union-attr]
    assert len(lineages) == 50  # each name a lineage of its own
    again = cli("keyset", "add", "--from-file", str(path), "--interval", "50s")
    assert again.code == 0 and "0 added, 1200 already registered" in again.stdout


def test_a_name_registered_with_another_policy_refuses_the_whole_file(
    cli: Cli, client: redis.Redis, tmp_path: Path
) -> None:
    assert cli("keyset", "add", "billing", "--interval", "6h").code == 0
    path = tmp_path / "names.txt"
    path.write_text("orders\nbilling\n")
    refused = cli("keyset", "add", "--from-file", str(path), "--interval", "50s")
    assert refused.code == 2
    assert refused.stderr.strip().splitlines() == [
        'rotator: key set billing is already registered with policy {"interval": "6h"}; '
        "change it with `rotator keyset update billing`"
    ]
    assert not client.hexists("rotator:keysets", "orders")  # nothing registered


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"good\nbad:name\n", "line 2: key set name 'bad:name' contains ':'"),
        (b"good\n\xc3\xa9\n", "line 2: key set names are ASCII"),
        (b"a" * 200 + b"\n", "line 1: key set name is longer than 128 bytes"),
        (b"\n\n", "no key set names"),
        (b"default\n", "key set default is defined in the config"),
    ],
)
def test_a_bad_file_is_refused_whole_naming_the_line(
    cli: Cli, client: redis.Redis, tmp_path: Path, content: bytes, said: str
) -> None:
    path = tmp_path / "names.txt"
    path.write_bytes(content)
    refused = cli("keyset", "add", "--from-file", str(path))
    assert refused.code == 2 and said in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not client.hexists("rotator:keysets", "good")  # nothing registered


def test_a_file_too_large_or_missing_is_refused(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = cli("keyset", "add", "--from-file", str(tmp_path / "absent"))
    assert missing.code == 2 and "No such file" in missing.stderr
    path = tmp_path / "big.txt"
    path.write_bytes(b"x\n" * 10)
    monkeypatch.setattr(keyset_file, "MAX_FILE_BYTES", 19)
    with pytest.raises(UsageError, match="larger than 19 bytes"):
        keyset_file.read_names(path)


def test_a_name_and_a_file_together_are_refused(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("one\n")
    both = cli("keyset", "add", "two", "--from-file", str(path))
    assert both.code == 2 and "one of them" in both.stderr
    assert cli("keyset", "add").code == 2


def test_one_issuer_for_a_file_of_key_sets_is_refused(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("one\ntwo\n")
    shared = cli("keyset", "add", "--from-file", str(path), "--issuer", "https://iam.example/t")
    assert shared.code == 2 and "--issuer cannot go with --from-file" in shared.stderr
    assert "one" not in cli("keyset", "list").stdout
