"""The ``issuer`` URL of a key set (OpenID Connect Discovery 1.0) and the URLs derived from it.

An issuer is checked hard, since verifiers compare it byte for byte with a
token's ``iss`` and fetch keys from the origin it names: ``https`` (``http``
only for ``localhost``, ``127.0.0.1`` and ``::1``), printable ASCII from a
short list of characters (so no percent-encoding: the path serve matches is
the path written), no userinfo, query or fragment, no empty, ``.`` or ``..``
path segment, at most `MAX_ISSUER_LENGTH` characters.

The discovery document is found at the issuer's path (without a trailing
``/``) plus `DISCOVERY_SUFFIX`; that path, `issuer_path`, is what two key sets
may not share (an issuer without a path shares ``""``, and serve picks the key
set by ``?keyset=`` there, as for the JWKS).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

__all__ = [
    "DISCOVERY_SUFFIX",
    "MAX_ISSUER_LENGTH",
    "issuer_path",
    "issuer_routes",
    "jwks_uri",
    "validate_issuer",
]

MAX_ISSUER_LENGTH = 255
DISCOVERY_SUFFIX = "/.well-known/openid-configuration"

# RFC 3986 unreserved and sub-delims plus the delimiters a scheme, host and path need;
# "%", "?", "#", "\\", spaces and controls are not in it.
_ALLOWED = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/\[\]]+")
_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_LOOPBACK = frozenset(("localhost", "127.0.0.1", "::1"))


def _check_host(netloc: str, host: str | None) -> None:
    if "@" in netloc:
        raise ValueError("must not carry userinfo")
    if netloc.endswith(":"):
        raise ValueError("has an empty port")
    if not host:
        raise ValueError("has no host")
    # urlsplit has checked a bracketed host to be an IPv6 address.
    if not netloc.startswith("[") and not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"host {host!r} is not a host name")


def validate_issuer(url: str) -> str:
    """*url* if it is a usable issuer (the module's rules); raise ``ValueError`` saying why."""
    if len(url) > MAX_ISSUER_LENGTH:
        raise ValueError(f"is longer than {MAX_ISSUER_LENGTH} characters")
    if "?" in url:
        raise ValueError("must not have a query")
    if "#" in url:
        raise ValueError("must not have a fragment")
    if not _ALLOWED.fullmatch(url):
        raise ValueError(
            "must be ASCII letters, digits and -._~!$&'()*+,;=:@/[] only (no percent-encoding)"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced "[" or "]"
        raise ValueError(f"is not a URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not url.startswith(parts.scheme + "://"):
        raise ValueError("must start with https://")
    _check_host(parts.netloc, parts.hostname)
    try:
        parts.port  # noqa: B018  (parsing the port is the check)
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ValueError("must be https (http only for localhost, 127.0.0.1 or ::1)")
    segments = parts.path.split("/")[1:]
    if segments and segments[-1] == "":  # one trailing "/" is allowed
        segments.pop()
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
            raise ValueError(f"path {parts.path!r} has an empty, '.' or '..' segment")
    return url


def issuer_path(issuer: str) -> str:
    """The path of *issuer* without a trailing ``/`` (``""`` for an issuer without a path):
    its discovery document is at this path plus `DISCOVERY_SUFFIX`."""
    return urlsplit(issuer).path.rstrip("/")


def jwks_uri(issuer: str, keyset: str) -> str:
    """The URL on *issuer*'s origin where ``rotator serve`` answers *keyset*'s JWKS."""
    parts = urlsplit(issuer)
    return f"{parts.scheme}://{parts.netloc}/.well-known/jwks.json?keyset={quote(keyset, safe='')}"


def issuer_routes(issuers: Mapping[str, str | None]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The key set of each issuer path that one key set alone claims, from each key set's
    issuer (*issuers*: name -> issuer or ``None``), and the paths claimed by several (with
    their key sets, sorted), which belong to none. The empty path is never claimed."""
    claims: dict[str, list[str]] = {}
    for name, issuer in issuers.items():
        if issuer is not None and issuer_path(issuer):
            claims.setdefault(issuer_path(issuer), []).append(name)
    routes = {path: names[0] for path, names in claims.items() if len(names) == 1}
    shared = {path: sorted(names) for path, names in claims.items() if len(names) > 1}
    return routes, shared
