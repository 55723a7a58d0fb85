"""``rotator token verify`` reports its verification, and ``revoke`` and ``rotate
--force-new`` say how many verifications the key they remove had in the last
cache_max_age, asking before they remove one still in use."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import redis

from tests.conftest import Cli, CliResult


@pytest.fixture(autouse=True)
def long_cache_max_age(cli: Cli) -> None:
    """A cache_max_age longer than each test, so what it counted is in the window asked."""
    cli.env.update(
        ROTATOR_ROTATION__INTERVAL="1000s",
        ROTATOR_ROTATION__OVERLAP="600s",
        ROTATOR_ROTATION__CACHE_MAX_AGE="300s",
    )


def run(cli: Cli, *args: str, answer: str | None = None) -> CliResult:
    """The CLI with no terminal on stdin, or with a terminal *answer* is typed at."""
    if answer is None:
        return cli(*args, stdin=subprocess.DEVNULL)
    controller, terminal = os.openpty()
    try:
        os.write(controller, answer.encode())
        return cli(*args, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)


def kids(cli: Cli) -> dict[str, str]:
    (doc,) = json.loads(cli("status", "--json").stdout)
    return {key["status"]: key["kid"] for key in doc["keys"]}


def test_revoke_of_a_key_in_use_asks_first(cli: Cli) -> None:
    assert cli("rotate").code == 0
    token = cli("token", "sign", "--claims", '{"sub": "u"}').stdout.strip()
    assert cli("rotate", "--force").code == 0
    retired = kids(cli)["retired"]
    for _ in range(2):
        verified = cli("token", "verify", token)
        assert verified.code == 0, verified.stderr
    (doc,) = json.loads(cli("status", "--json").stdout)
    (key,) = [key for key in doc["keys"] if key["kid"] == retired]
    assert key["verifications"]["recent"] == 2

    refused = run(cli, "revoke", retired)
    assert refused.code == 1
    assert refused.stderr.count("\n") == 1 and "2 verification(s)" in refused.stderr
    assert "--yes" in refused.stderr and "Traceback" not in refused.stderr
    declined = run(cli, "revoke", retired, answer="n\n")
    assert declined.code == 1 and "not removed" in declined.stderr
    assert kids(cli)["retired"] == retired
    confirmed = run(cli, "revoke", retired, answer="y\n")
    assert confirmed.code == 0, confirmed.stderr
    assert "2 verification(s)" in confirmed.stdout
    assert "retired" not in kids(cli)


def test_revoke_yes_goes_ahead_without_a_terminal(cli: Cli, client: redis.Redis) -> None:
    assert cli("rotate").code == 0
    assert cli("rotate", "--force").code == 0
    retired = kids(cli)["retired"]
    client.hincrby(f"rotator:{{default}}:usage:{int(time.time() // 60)}", f"accepted:{retired}", 5)
    done = run(cli, "revoke", retired, "--yes")
    assert done.code == 0, done.stderr
    assert "5 verification(s)" in done.stdout and "retired" not in kids(cli)


def test_force_new_counts_the_next_key_it_drops(cli: Cli, client: redis.Redis) -> None:
    assert cli("rotate").code == 0
    upcoming = kids(cli)["next"]
    client.hincrby(
        f"rotator:{{default}}:usage:{int(time.time() // 60)}", f"refused:BadSignature:{upcoming}", 3
    )
    refused = run(cli, "rotate", "--force-new")
    assert refused.code == 1 and "3 verification(s)" in refused.stderr
    assert kids(cli)["next"] == upcoming
    done = run(cli, "rotate", "--force-new", "--yes")
    assert done.code == 0, done.stderr
    assert kids(cli)["next"] != upcoming
