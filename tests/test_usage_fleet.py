"""Several reader processes verify known numbers of tokens per kid against one real Redis:
the sums they report, in Redis and in ``rotator status --json``, are exact."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
from pathlib import Path

import redis

from rotator.core.envelope import parse_keks
from rotator.embedded import EmbeddedRedis
from rotator.library.errors import InvalidToken
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from tests.conftest import Cli
from tests.test_usage import CLAIMS, hostile_tokens
from tests.test_usage import totals as usage_totals

READERS = 3
PER_KID = {"old": 31, "new": 17}
HOSTILE_PER_READER = 7
GARBAGE_PER_READER = 2


def verify_all(url: str, tokens: list[str]) -> None:
    """One reader process: verify *tokens* (flushing every 50 ms meanwhile), then close."""
    with JWKSReader(url, follow=False, usage_interval=0.05) as reader:
        for token in tokens:
            with contextlib.suppress(InvalidToken):
                reader.verify(token, audience="svc", issuer="iam")


def sign(url: str, kek_file: Path, count: int) -> tuple[str, list[str]]:
    keyring = parse_keks(kek_file.read_text(), source=str(kek_file))
    with Signer(url, keyring, max_token_ttl=30, follow=False) as signer:
        return signer.current_kid or "", [signer.sign(CLAIMS, ttl=30) for _ in range(count)]


def test_sums_over_reader_processes_are_exact_in_redis_and_status(
    cli: Cli, redis_server: EmbeddedRedis, kek_file: Path, client: redis.Redis
) -> None:
    assert cli("rotate").code == 0
    old, old_tokens = sign(redis_server.url, kek_file, PER_KID["old"])
    assert cli("rotate", "--force").code == 0
    new, new_tokens = sign(redis_server.url, kek_file, PER_KID["new"])
    assert old != new
    context = multiprocessing.get_context("spawn")
    workers = []
    for i in range(READERS):
        tokens = old_tokens[i::READERS] + new_tokens[i::READERS]
        tokens += hostile_tokens(HOSTILE_PER_READER) + ["garbage"] * GARBAGE_PER_READER
        workers.append(context.Process(target=verify_all, args=(redis_server.url, tokens)))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0

    totals = usage_totals(client)
    assert int(totals[f"accepted:{old}"]) == PER_KID["old"]
    assert int(totals[f"accepted:{new}"]) == PER_KID["new"]
    assert int(totals["refused:UnknownKid:unknown"]) == READERS * HOSTILE_PER_READER
    assert int(totals["refused:MalformedToken:-"]) == READERS * GARBAGE_PER_READER

    status = cli("status", "--json")
    assert status.code == 0, status.stderr
    (doc,) = json.loads(status.stdout)
    by_kid = {key["kid"]: key["verifications"] for key in doc["keys"]}
    for kid, count in ((old, PER_KID["old"]), (new, PER_KID["new"])):
        assert by_kid[kid]["total"] == by_kid[kid]["recent"] == by_kid[kid]["accepted"] == count
        assert by_kid[kid]["last_verified_at_epoch"] is not None
    assert doc["unmatched_verifications"]["unknown"]["total"] == READERS * HOSTILE_PER_READER
    assert doc["unmatched_verifications"]["-"]["recent"] == READERS * GARBAGE_PER_READER
    (unused,) = set(by_kid) - {old, new}  # the next key: no token names it yet
    assert by_kid[unused]["total"] == 0 and by_kid[unused]["last_verified_at"] is None
    text = cli("status", "--table").stdout
    assert "VERIFICATIONS" in text and f"{PER_KID['old']:>10} {PER_KID['old']:>10}" in text
