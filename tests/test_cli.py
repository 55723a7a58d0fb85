"""The rotator command, run as a real subprocess against a real Redis."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jwt
import pytest
import redis

from rotator.core.entry import lineage_of, policy_of
from rotator.embedded import free_port
from tests.conftest import Cli


def test_rotate_status_jwks_and_revoke(cli: Cli, client: redis.Redis) -> None:
    first = cli("rotate")
    assert first.code == 0, first.stderr
    assert "bootstrap" in first.stdout
    too_soon = cli("rotate")
    assert too_soon.code == 1
    assert too_soon.stderr.count("\n") == 1 and "cache_max_age" in too_soon.stderr
    assert "Traceback" not in too_soon.stderr
    forced = cli("rotate", "--force")
    assert forced.code == 0 and "rotate (manual)" in forced.stdout

    status = cli("status", "--json")
    assert status.code == 0
    (doc,) = json.loads(status.stdout)
    assert doc["version"] == 2
    assert [k["status"] for k in doc["keys"]] == ["current", "next", "retired"]
    assert doc["next_rotation_at"] > doc["updated_at"]
    assert doc["shard"] == 0 and doc["leader"] is None  # no daemon runs
    human = cli("status")
    assert "key set default  version 2" in human.stdout
    assert human.stdout.endswith("shards (1): 0 led by no daemon\n")
    assert "current" in human.stdout and "retired" in human.stdout

    jwks = json.loads(cli("jwks").stdout)
    assert [k["kid"] for k in jwks["keys"]] == [k["kid"] for k in doc["keys"]]
    assert json.loads(client.get("rotator:{default}:jwks") or b"") == jwks

    retired = doc["keys"][2]["kid"]
    revoked = cli("revoke", retired)
    assert revoked.code == 0, revoked.stderr
    assert f"default: revoke {retired}\n" in revoked.stdout, revoked.stdout
    assert retired not in cli("jwks").stdout
    unknown = cli("revoke", retired)
    assert unknown.code == 1 and "has no key" in unknown.stderr


def _numbers(value: object) -> list[object]:
    """Every number in a JSON document, at any depth."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_json_times_are_rfc3339_with_whole_epoch_seconds_beside(cli: Cli) -> None:
    assert cli("rotate").code == 0
    assert cli("rotate", "--force").code == 0
    (doc,) = json.loads(cli("status", "--json").stdout)
    retired = doc["keys"][2]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", retired["retired_at"])
    assert datetime.fromisoformat(retired["retired_at"]).timestamp() == retired["retired_at_epoch"]
    assert doc["next_rotation_at"] > doc["updated_at"] and doc["overdue"] is False
    assert doc["keys"][1]["activated_at"] is None  # next has not signed yet
    (row,) = json.loads(cli("keyset", "list", "--json").stdout)
    assert row["next_rotation_at"] == doc["next_rotation_at"]
    for document in (doc, row):
        assert all(isinstance(n, int) for n in _numbers(document)), document  # no floats
    table = cli("status", "--table").stdout
    assert "RETIRED" in table and retired["retired_at"] in table


def test_force_new_replaces_both_keys(cli: Cli) -> None:
    cli("rotate")
    (before,) = json.loads(cli("status", "--json").stdout)
    result = cli("rotate", "--force-new")
    assert result.code == 0, result.stderr
    (after,) = json.loads(cli("status", "--json").stdout)
    old = {k["kid"] for k in before["keys"]}
    assert after["keys"][0]["kid"] not in old
    assert before["keys"][1]["kid"] not in {k["kid"] for k in after["keys"]}


def test_bad_config_exits_2_naming_the_field(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[rotation]\noverlap = "50s"\n')
    del cli.env["ROTATOR_ROTATION__OVERLAP"]  # env would override the file
    result = cli("--config", str(config), "status")
    assert result.code == 2
    assert result.stderr.startswith("rotator: rotation.overlap: 50s must be >=")
    assert "Traceback" not in result.stderr
    cli.env["ROTATOR_ROTATION__INTERVAL"] = "often"
    env_result = cli("status")
    named = "rotation.interval (set by ROTATOR_ROTATION__INTERVAL): invalid duration"
    assert env_result.code == 2 and named in env_result.stderr


def test_bad_arguments_exit_2(cli: Cli) -> None:
    assert cli("rotate", "--keyset", "a:b").code == 2
    unknown = cli("rotate", "--keyset", "nosuch")
    assert unknown.code == 2 and "keyset add nosuch" in unknown.stderr
    assert cli("frobnicate").code == 2


def test_unreachable_redis_exits_1(cli: Cli) -> None:
    cli.env["ROTATOR_REDIS__URL"] = f"redis://127.0.0.1:{free_port()}/0"
    cli.env["ROTATOR_REDIS__SOCKET_TIMEOUT"] = "1s"
    result = cli("status")
    assert result.code == 1
    assert result.stderr.startswith("rotator: cannot reach Redis")
    assert "Traceback" not in result.stderr


def test_run_refuses_to_start_without_a_kek(cli: Cli) -> None:
    del cli.env["ROTATOR_KEYS__KEK_FILE"]
    result = cli("run")
    assert result.code == 2
    assert "no KEK configured" in result.stderr


def test_keyset_add_list_remove(cli: Cli, client: redis.Redis) -> None:
    added = cli("keyset", "add", "billing")
    assert added.code == 0 and "billing: bootstrap" in added.stdout
    lineage = lineage_of(entry(client, "billing"))
    assert lineage is not None and policy_of(entry(client, "billing")) == "{}"
    assert client.exists("rotator:{billing}:jwks")
    listing = cli("keyset", "list", "--json")
    assert [(r["keyset"], r["origin"], r["version"]) for r in json.loads(listing.stdout)] == [
        ("billing", "registry", 1),
        ("default", "config", 0),
    ]
    assert cli("rotate", "--keyset", "billing", "--force").code == 0
    refused = cli("keyset", "remove", "billing")
    assert refused.code == 2 and "--yes" in refused.stderr
    assert client.exists("rotator:{billing}:jwks")
    assert cli("keyset", "remove", "billing", "--yes").code == 0
    assert not client.exists("rotator:{billing}:jwks", "rotator:{billing}:state")
    assert client.hget("rotator:keysets", "billing") == b"removed"  # a tombstone
    assert "billing" not in cli("keyset", "list").stdout
    assert cli("keyset", "remove", "billing", "--yes").code == 2  # not registered any more
    again = cli("keyset", "add", "billing")
    assert again.code == 0 and "billing: bootstrap" in again.stdout
    assert lineage_of(entry(client, "billing")) not in {None, lineage}  # a lineage of its own
    assert cli("keyset", "remove", "default", "--yes").code == 2


def entry(client: redis.Redis, name: str) -> str:
    raw: bytes | None = client.hget("rotator:keysets", name)  # type: ignore[assignment]
    assert raw is not None
    return raw.decode()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("bad name", "spaces"),
        ("a{b}", "braces"),
        ("a:b", "colons"),
        ("tab\there", "control"),
        ("x" * 129, "longer than 128 bytes"),
    ],
)
def test_keyset_names_are_checked(cli: Cli, client: redis.Redis, name: str, why: str) -> None:
    result = cli("keyset", "add", name)
    assert result.code == 2 and why in result.stderr and "Traceback" not in result.stderr
    assert not client.exists("rotator:keysets")


def test_keyset_policy_is_stored_with_the_set_and_drives_its_schedule(
    cli: Cli, client: redis.Redis
) -> None:
    added = cli("keyset", "add", "fast", "--interval", "50s", "--jitter", "0s")
    assert added.code == 0, added.stderr
    assert json.loads(policy_of(entry(client, "fast"))) == {"interval": "50s", "jitter": "0s"}
    lineage = lineage_of(entry(client, "fast"))
    assert cli("keyset", "add", "slow", "--schedule", "0 3 * * *").code == 0
    rows = {r["keyset"]: r for r in json.loads(cli("keyset", "list", "--json").stdout)}
    fast = json.loads(cli("status", "--keyset", "fast", "--json").stdout)[0]
    created = fast["keys"][0]["created_at_epoch"]
    assert rows["fast"]["next_rotation_at_epoch"] == created + 50  # not the config's 100s
    assert rows["slow"]["policy"] == {"schedule": "0 3 * * *"}
    assert rows["slow"]["next_rotation_at_epoch"] % 86400 >= 3 * 3600  # 03:00 UTC plus jitter
    text = cli("keyset", "list").stdout
    assert "every 50s" in text and "'0 3 * * *'" in text

    # the same add again is idempotent; a different policy must go through update
    assert "already registered" in cli("keyset", "add", "fast", "--interval", "50s",
                                       "--jitter", "0s").stdout  # fmt: skip
    clash = cli("keyset", "add", "fast", "--interval", "60s")
    assert clash.code == 2 and "keyset update fast" in clash.stderr
    updated = cli("keyset", "update", "fast", "--overlap", "2m")
    assert updated.code == 0, updated.stderr
    assert json.loads(entry(client, "fast")) == {
        "interval": "50s",
        "jitter": "0s",
        "overlap": "2m",
        "lineage": lineage,  # an update keeps the lineage
    }
    switched = cli("keyset", "update", "fast", "--schedule", "*/5 * * * *")
    assert switched.code == 0
    assert "interval" not in json.loads(entry(client, "fast"))
    client.hset("rotator:keysets", "legacy", '{"interval": "70s"}')  # an older release's entry
    assert cli("keyset", "update", "legacy", "--overlap", "2m").code == 0
    assert entry(client, "legacy") == '{"interval": "1m10s", "overlap": "2m"}'  # still none


def test_keyset_policy_errors_name_the_flag_and_store_nothing(
    cli: Cli, client: redis.Redis
) -> None:
    for args, expected in [
        (["--interval", "soon"], "--interval"),
        (["--interval", "30s"], "--cache-max-age"),  # 20s is more than half of 30s
        (["--overlap", "10s"], "--overlap"),
        (["--schedule", "not cron"], "--schedule"),
        (["--jitter", "200s"], "--jitter"),
        (["--algorithm", "HS256"], "--algorithm"),
        (["--algorithm", "RS256", "--rsa-bits", "1024"], "--rsa-bits"),
    ]:
        result = cli("keyset", "add", "app", *args)
        assert result.code == 2, args
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not client.exists("rotator:keysets", "rotator:{app}:state")
    refused = cli("keyset", "add", "default", "--interval", "1h")
    assert refused.code == 2 and "defined in the config" in refused.stderr


def test_keyset_algorithm_is_a_flag_that_applies_from_the_next_rotation(
    cli: Cli, client: redis.Redis
) -> None:
    assert cli("keyset", "add", "ed", "--algorithm", "EdDSA").code == 0
    ed = json.loads(cli("status", "--keyset", "ed", "--json").stdout)[0]
    assert {k["alg"] for k in ed["keys"]} == {"EdDSA"}, ed
    updated = cli("keyset", "update", "ed", "--algorithm", "ES384")
    assert updated.code == 0, updated.stderr
    assert json.loads(policy_of(entry(client, "ed"))) == {"algorithm": "ES384"}
    assert "ES384" in cli("keyset", "list").stdout
    rotated = cli("rotate", "--keyset", "ed", "--force")
    assert rotated.code == 0, rotated.stderr
    keys = json.loads(cli("status", "--keyset", "ed", "--json").stdout)[0]["keys"]
    assert [(k["status"], k["alg"]) for k in keys] == [
        ("current", "EdDSA"),  # the next published before the change signs now
        ("next", "ES384"),
        ("retired", "EdDSA"),
    ]


@pytest.mark.parametrize("algorithm", ["ES384", "EdDSA", "RS256"])
def test_token_sign_and_verify_use_the_keys_algorithm(cli: Cli, algorithm: str) -> None:
    flags = ["--rsa-bits", "2048"] if algorithm == "RS256" else []
    assert cli("keyset", "add", "app", "--algorithm", algorithm, *flags).code == 0
    signed = cli("token", "sign", "--keyset", "app", "--claims", '{"sub": "me"}')
    assert signed.code == 0, signed.stderr
    token = signed.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    checked = cli("token", "verify", token, "--keyset", "app")
    assert checked.code == 0, checked.stderr
    assert json.loads(checked.stdout)["sub"] == "me"


def test_token_verify_reads_no_kek(cli: Cli, tmp_path: Path) -> None:
    """A host that only verifies holds no KEK: a KEK file it cannot read fails `token
    sign` (exit 2, naming the setting) and leaves `token verify` alone."""
    assert cli("keyset", "add", "app").code == 0
    signed = cli("token", "sign", "--keyset", "app", "--claims", '{"sub": "me"}')
    assert signed.code == 0, signed.stderr
    verifier = Cli({**cli.env, "ROTATOR_KEYS__KEK_FILE": str(tmp_path / "absent")}, cli.cwd)
    checked = verifier("token", "verify", signed.stdout.strip(), "--keyset", "app")
    assert checked.code == 0, checked.stderr
    assert json.loads(checked.stdout)["sub"] == "me"
    refused = verifier("token", "sign", "--keyset", "app", "--claims", '{"sub": "me"}')
    assert refused.code == 2 and "kek_file" in refused.stderr, refused.stderr


def test_a_broken_stored_policy_fails_that_keyset_alone(cli: Cli, client: redis.Redis) -> None:
    assert cli("keyset", "add", "good").code == 0
    client.hset("rotator:keysets", "broken", '{"interval": "often"}')
    rows = {r["keyset"]: r for r in json.loads(cli("keyset", "list", "--json").stdout)}
    assert "stored policy: interval" in rows["broken"]["error"]
    assert rows["good"]["version"] == 1
    rotate = cli("rotate", "--keyset", "broken")
    assert rotate.code == 1 and "stored policy" in rotate.stderr
    assert client.hget("rotator:keysets", "broken") == b'{"interval": "often"}'  # kept


def test_a_registry_from_an_older_release_is_converted_on_the_first_write(
    cli: Cli, client: redis.Redis
) -> None:
    client.sadd("rotator:keysets", "legacy-a", "legacy-b")
    listing = json.loads(cli("keyset", "list", "--json").stdout)
    assert [r["keyset"] for r in listing] == ["default", "legacy-a", "legacy-b"]
    assert cli("keyset", "add", "new", "--interval", "1h").code == 0
    assert client.type("rotator:keysets") == b"hash"
    registry: dict[bytes, bytes] = client.hgetall("rotator:keysets")  # type: ignore[assignment]
    assert registry.keys() == {b"legacy-a", b"legacy-b", b"new"}
    assert registry[b"legacy-a"] == registry[b"legacy-b"] == b"{}"
    assert policy_of(registry[b"new"].decode()) == '{"interval": "1h"}'


def test_check_config_masks_secrets(cli: Cli, kek_file: Path) -> None:
    secret_line = kek_file.read_text().strip()
    cli.env["ROTATOR_REDIS__URL"] = "redis://app:hunter2@localhost:6379/0"
    result = cli("check-config")
    assert result.code == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert secret_line.split(":")[1] not in result.stdout
    doc = json.loads(result.stdout)
    assert doc["redis"]["url"] == "redis://app:***@localhost:6379/0"
    assert doc["keys"]["kek_ids"] == ["k1"]
    assert doc["effective_policies"]["default"]["interval"] == "1m40s"
    assert doc["effective_policies"]["default"]["jitter"] == "5s"  # 5 % of 100s, as it applies
    assert doc["rotation"]["interval"] == "1m40s" and doc["rotation"]["jitter"] == "5s"
    assert None not in doc["rotation"].values()  # effective values, not what was left unset
    del cli.env["ROTATOR_KEYS__KEK_FILE"]
    cli.env["ROTATOR_KEYS__KEKS"] = secret_line
    masked = cli("check-config")
    assert secret_line.split(":")[1] not in masked.stdout


def test_kek_generate_prints_a_usable_line(cli: Cli, tmp_path: Path) -> None:
    line = cli("kek", "generate", "--id", "2026-11").stdout.strip()
    assert line.startswith("2026-11:")
    cli.env["ROTATOR_KEYS__KEK_FILE"] = str(tmp_path / "new")
    (tmp_path / "new").write_text(line)
    assert cli("check-config").code == 0
    assert cli("kek", "generate", "--id", "bad id").code == 2


def test_reseal_and_wrong_kek(cli: Cli, kek_file: Path, tmp_path: Path) -> None:
    assert cli("rotate").code == 0
    rotated = tmp_path / "rotated"
    new_line = cli("kek", "generate", "--id", "k2").stdout.strip()
    rotated.write_text(new_line + "\n" + kek_file.read_text())
    rotated.chmod(0o600)
    cli.env["ROTATOR_KEYS__KEK_FILE"] = str(rotated)
    result = cli("reseal")
    assert result.code == 0 and "default: resealed under KEK k2" in result.stdout
    only_old = tmp_path / "only-old"
    only_old.write_text(kek_file.read_text())
    cli.env["ROTATOR_KEYS__KEK_FILE"] = str(only_old)
    refused = cli("rotate", "--force")
    assert refused.code == 1
    assert "sealed with KEK 'k2', which is not configured" in refused.stderr


def test_repair_and_status_of_corrupt_state(cli: Cli, client: redis.Redis) -> None:
    assert cli("rotate").code == 0
    client.set("rotator:{default}:state", b'{"format": 1, "version": "x"}')
    status = cli("status")
    assert status.code == 1 and "UNREADABLE" in status.stdout
    assert cli("rotate", "--force").code == 1
    assert client.get("rotator:{default}:state") == b'{"format": 1, "version": "x"}'
    repaired = cli("repair", "--keyset", "default")
    assert repaired.code == 0, repaired.stderr
    assert "moved to rotator:{default}:state:corrupt:" in repaired.stdout
    assert cli("status").code == 0


def test_a_kid_starting_with_a_dash_is_an_argument_not_an_option() -> None:
    from rotator.cli.main import _parser, shield_kids

    kid = "-" + "A" * 42
    for argv in (
        ["revoke", kid],
        ["revoke", kid, "--keyset", "b"],
        ["revoke", "--keyset", "b", kid],
    ):
        args = _parser().parse_args(shield_kids(argv))
        assert args.kid == kid
    assert _parser().parse_args(shield_kids(["revoke", "--", kid])).kid == kid
    assert shield_kids(["--config", kid, "status"]) == ["--config", kid, "status"]
