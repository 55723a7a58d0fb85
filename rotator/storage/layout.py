"""Names of everything rotator keeps in Redis, and the rules for key set names.

Every key of key set ``S`` carries the hash tag ``{S}``, so in Redis Cluster a
key set's state and JWKS share one slot and one script can write both.

Leadership is split into ``shards`` shards (`rotator.storage.lease`). A key set belongs
to the shard its Cluster slot falls in when the 16,384 slots are cut into ``shards``
equal ranges (`Layout.shard_of`), so a shard's key sets lie on the few masters that
serve its range, on a single Redis as in Cluster. Each shard's due index and epoch carry
the shard's own hash tag; the leases and the membership of live daemons share one tag,
so one script steps them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = [
    "DEFAULT_KEYSET",
    "MAX_SHARDS",
    "Layout",
    "validate_keyset_name",
    "validate_prefix",
]

#: The most shards ``daemon.shards`` accepts: every lease step touches each shard's lease
#: in one script, and more shards than this would outnumber any fleet of daemons anyway.
MAX_SHARDS = 1024

DEFAULT_KEYSET = "default"
_MAX_NAME_BYTES = 128
_FORBIDDEN = frozenset("{}:")


def validate_keyset_name(name: str) -> str:
    """Return *name* if it is safe in a Redis key and an HTTP header (ASCII, at most 128
    bytes, printable, no braces, colons or spaces); else raise ``ValueError``."""
    if not name:
        raise ValueError("key set name is empty")
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise ValueError(f"key set name is longer than {_MAX_NAME_BYTES} bytes")
    if not name.isascii():
        # HTTP carries the name in X-App-Name, whose bytes are not UTF-8 by rule (RFC 9110
        # section 5.5): a non-ASCII name could be stored but never asked for there.
        shown = ", ".join(repr(c) for c in sorted({c for c in name if not c.isascii()}))
        raise ValueError(f"key set name {name!r} contains {shown}: key set names are ASCII")
    bad = sorted({c for c in name if c in _FORBIDDEN or not c.isprintable() or c.isspace()})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(
            f"key set name {name!r} contains {shown}: braces, colons, spaces and control "
            "characters are not allowed"
        )
    return name


def validate_prefix(prefix: str) -> str:
    """Return *prefix* if it cannot break the key layout (no braces, spaces or control chars)."""
    if not prefix:
        raise ValueError("prefix is empty")
    if any(c in "{}" or not c.isprintable() or c.isspace() for c in prefix):
        raise ValueError(f"prefix {prefix!r} may not contain braces, spaces or control characters")
    return prefix


@dataclass(frozen=True)
class Layout:
    """Redis key names under one prefix, with leadership split into *shards* shards."""

    prefix: str = "rotator"
    shards: int = 1

    def shard_of(self, keyset: str) -> int:
        """The shard of *keyset*: where its Cluster slot falls among *shards* equal ranges
        of slots (stable: the same name, prefix and shard count give the same shard)."""
        slot = key_slot(self.state(keyset).encode("utf-8", "surrogateescape"))
        return slot * self.shards // REDIS_CLUSTER_HASH_SLOTS

    def state(self, keyset: str) -> str:
        """Versioned state document with sealed private keys."""
        return f"{self.prefix}:{{{keyset}}}:state"

    def jwks(self, keyset: str) -> str:
        """Public JWKS, served byte for byte."""
        return f"{self.prefix}:{{{keyset}}}:jwks"

    def roles(self, keyset: str) -> str:
        """Each published kid's role, bound to the JWKS bytes (`rotator.core.roles`),
        written with the JWKS; readable by the verifier ACL role."""
        return f"{self.prefix}:{{{keyset}}}:roles"

    def quarantine(self, keyset: str, stamp: int) -> str:
        """Where `rotator repair` moves a state document it could not read."""
        return f"{self.prefix}:{{{keyset}}}:state:corrupt:{stamp}"

    def usage(self, keyset: str) -> str:
        """Hash of the verifications readers reported, per kid and outcome
        (`rotator.storage.usage`)."""
        return f"{self.prefix}:{{{keyset}}}:usage"

    def usage_minute(self, keyset: str, minute: int) -> str:
        """Hash of the verifications readers reported in one minute (``Unix time // 60``)."""
        return f"{self.prefix}:{{{keyset}}}:usage:{minute}"

    @property
    def keysets(self) -> str:
        """Hash of key sets registered at run time: name -> stored policy overrides (JSON)."""
        return f"{self.prefix}:keysets"

    @property
    def registry_version(self) -> str:
        """Counter every write of the registry moves (`rotator.storage.store`), so a daemon
        reads the whole registry only when it moved. Tagged with the registry's own name,
        so in Redis Cluster it lies in the registry's slot and one script writes both."""
        return f"{self.prefix}:{{{self.keysets}}}:version"

    @property
    def events(self) -> str:
        """Pub/sub channel announcing every commit."""
        return f"{self.prefix}:events"

    @property
    def audit(self) -> str:
        """Capped stream of lifecycle events."""
        return f"{self.prefix}:audit"

    def due(self, shard: int) -> str:
        """Sorted set: key set name -> when it next needs the leader
        (`lifecycle.next_change_at`), for the key sets of *shard*; filed by every commit."""
        return f"{self.prefix}:{{shard-{shard}}}:due"

    def epoch(self, shard: int) -> str:
        """Counter every commit of a key set of *shard* moves: a daemon that sees it go
        backwards or vanish knows Redis lost data."""
        return f"{self.prefix}:{{shard-{shard}}}:epoch"

    def lease(self, shard: int) -> str:
        """The lease of *shard*: the token of the daemon leading it, with a TTL."""
        return f"{self.prefix}:{{leases}}:shard-{shard}"

    @property
    def members(self) -> str:
        """Sorted set of the live daemons: token -> when its heartbeat lapses (Redis time,
        milliseconds). In the leases' slot, so one script reads both."""
        return f"{self.prefix}:{{leases}}:members"
