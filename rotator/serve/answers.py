"""The answers `rotator serve` has built (JWKS, discovery documents), kept apart from the
readers' copies.

An answer (status line, headers, body as bytes) is built once per copy of a
key set under one generation of the policies (`rotator.serve.policies`) and
reused while both stay: the copy is recognised by its JWKS's ``ETag``, a
digest of the bytes served, so the cache depends on nothing of how the
reader holds its copies. At most *size* key sets' answers are kept (the reader's own
bound); beyond it the oldest built goes first and is rebuilt on its next use.

Concurrency: `AnswerCache.get` runs on the event loop and the request threads
without a lock (one dict lookup); `AnswerCache.put` runs on either, under
``_lock``, which guards every change of the dict, evictions included.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from rotator.serve.httpd import Reply

__all__ = ["AnswerCache", "Answers"]


class Answers(NamedTuple):
    """The answers built for one copy of a key set (its JWKS's *etag*) under one
    *generation* of the policies; *tag* is the ``ETag`` the answer carries (the JWKS's for
    the JWKS, the document's for a discovery document), which ``If-None-Match`` names."""

    etag: str
    generation: int
    ok: Reply
    not_modified: Reply
    tag: str


class AnswerCache:
    """The last `Answers` built for each key (a key set, or what the holder makes of one),
    at most *size* of them."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 1)
        self._lock = threading.Lock()
        self._built: dict[str, Answers] = {}

    def get(self, keyset: str, etag: str, generation: int) -> Answers | None:
        """The answers built for *keyset*, if for the copy *etag* and *generation*."""
        built = self._built.get(keyset)
        if built is None or built.etag != etag or built.generation != generation:
            return None
        return built

    def put(self, keyset: str, answers: Answers) -> None:
        """Keep *answers* for *keyset*, in place of any before."""
        with self._lock:
            self._built.pop(keyset, None)
            self._built[keyset] = answers
            while len(self._built) > self.size:
                del self._built[next(iter(self._built))]

    def __len__(self) -> int:
        return len(self._built)
