"""Private keys at rest: an AES-256-GCM envelope under a key-encryption key (KEK).

A sealed key records which KEK sealed it, and binds the key set and kid as
associated data, so a blob copied to another key set or kid fails to open.
Several KEKs may be configured: the first seals, every one unseals, which is
how a KEK is rotated (add the new one first, `rotator reseal`, drop the old).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rotator.core.strictjson import shown

__all__ = [
    "Kek",
    "KekError",
    "Keyring",
    "SealedKey",
    "UnsealError",
    "generate_kek_line",
    "parse_keks",
]

_KEK_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEK_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
# A sealed PKCS#8 key is about 140 bytes for P-256 and under 4,800 for the largest RSA key
# accepted (8192 bits); anything far larger is not one.
_MAX_SEALED_BYTES = 6144


class KekError(ValueError):
    """The KEK configuration is unusable (the message says which line and why)."""


class UnsealError(Exception):
    """A sealed key cannot be opened with the configured KEKs."""


@dataclass(frozen=True)
class Kek:
    """One key-encryption key. Its bytes never appear in a repr."""

    id: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class SealedKey:
    """A private key sealed under KEK `kek`: nonce and ciphertext (with GCM tag)."""

    kek: str
    nonce: bytes
    ciphertext: bytes = field(repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> SealedKey:
        """Parse the stored form (`encoding.encode_sealed` writes it); raises ``ValueError``
        on anything malformed: members that are not strings, a KEK id that `parse_keks`
        would refuse, base64 that is not strict standard base64, a nonce of other than 12
        bytes, or a ciphertext shorter than a GCM tag or longer than any sealed P-256 key."""
        kek, nonce, ct = data.get("kek"), data.get("nonce"), data.get("ct")
        if not (isinstance(kek, str) and isinstance(nonce, str) and isinstance(ct, str)):
            raise ValueError("sealed key needs string members kek, nonce, ct")
        if not _KEK_ID.fullmatch(kek):
            raise ValueError("sealed key names a KEK id that is not 1-64 letters, digits, . _ -")
        try:
            raw_nonce = base64.b64decode(nonce, validate=True)
            raw_ct = base64.b64decode(ct, validate=True)
        except (binascii.Error, ValueError) as exc:  # non-ASCII text is a ValueError
            raise ValueError(f"sealed key is not valid base64: {exc}") from None
        if len(raw_nonce) != _NONCE_BYTES:
            raise ValueError(f"sealed key nonce is {len(raw_nonce)} bytes, not {_NONCE_BYTES}")
        if not _TAG_BYTES < len(raw_ct) <= _MAX_SEALED_BYTES:
            raise ValueError(
                f"sealed key ciphertext is {len(raw_ct)} bytes, not {_TAG_BYTES + 1} to "
                f"{_MAX_SEALED_BYTES}"
            )
        return cls(kek, raw_nonce, raw_ct)


def _aad(keyset: str, kid: str) -> bytes:
    return f"rotator/v1|{keyset}|{kid}".encode()


@dataclass(frozen=True)
class Keyring:
    """The configured KEKs, in order: the first seals, all unseal."""

    keks: tuple[Kek, ...]

    def __post_init__(self) -> None:
        if not self.keks:
            raise KekError("no KEK configured")

    @property
    def sealing_id(self) -> str:
        """Id of the KEK that seals new keys."""
        return self.keks[0].id

    def seal(self, private_der: bytes, *, keyset: str, kid: str) -> SealedKey:
        """Seal *private_der* under the first KEK, bound to *keyset* and *kid*."""
        kek = self.keks[0]
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(kek.key).encrypt(nonce, private_der, _aad(keyset, kid))
        return SealedKey(kek.id, nonce, ciphertext)

    def unseal(self, sealed: SealedKey, *, keyset: str, kid: str) -> bytes:
        """Open *sealed*; raise `UnsealError` naming the KEK id if that is impossible."""
        kek = next((k for k in self.keks if k.id == sealed.kek), None)
        if kek is None:
            configured = ", ".join(k.id for k in self.keks)
            raise UnsealError(
                f"key {kid} of key set {keyset} is sealed with KEK {sealed.kek!r}, which is not "
                f"configured (configured: {configured})"
            )
        try:
            return AESGCM(kek.key).decrypt(sealed.nonce, sealed.ciphertext, _aad(keyset, kid))
        except InvalidTag:
            raise UnsealError(
                f"KEK {sealed.kek!r} does not open key {kid} of key set {keyset}: the KEK "
                "material under that id differs from the one that sealed it, or the blob "
                "was altered"
            ) from None


def parse_keks(text: str, *, source: str) -> Keyring:
    """Parse KEK lines ``ID:BASE64`` (newline or comma separated, ``#`` comments allowed)."""
    keks: list[Kek] = []
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for number, entry in enumerate(entries, start=1):
        if not entry or entry.startswith("#"):
            continue
        kek_id, sep, encoded = entry.partition(":")
        if not sep or not _KEK_ID.fullmatch(kek_id):
            raise KekError(
                f"{source}: entry {number} is not ID:BASE64 with an ID of letters, digits, '.', "
                "'_' or '-'"
            )
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except ValueError:  # binascii.Error, or a character that is not ASCII
            raise KekError(f"{source}: KEK {kek_id!r} is not valid base64") from None
        if len(key) != _KEK_BYTES:
            raise KekError(f"{source}: KEK {kek_id!r} is {len(key)} bytes, must be {_KEK_BYTES}")
        if any(k.id == kek_id for k in keks):
            raise KekError(f"{source}: KEK id {kek_id!r} appears twice")
        keks.append(Kek(kek_id, key))
    if not keks:
        raise KekError(f"{source}: holds no KEK")
    return Keyring(tuple(keks))


def generate_kek_line(kek_id: str) -> str:
    """A new KEK line ``ID:BASE64`` from the OS random source."""
    if not _KEK_ID.fullmatch(kek_id):
        raise KekError(f"KEK id {shown(kek_id)} must be 1-64 letters, digits, '.', '_' or '-'")
    return f"{kek_id}:{base64.b64encode(os.urandom(_KEK_BYTES)).decode('ascii')}"
