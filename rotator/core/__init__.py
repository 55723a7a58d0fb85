"""The pure core: durations, policy, the key lifecycle, the state document, JWK and
the canonical encodings, the envelope crypto that seals a private key, the format of a
key set registry entry and the rules a registration or policy update of one passes.

Nothing here does I/O or keeps a clock: every function takes ``now`` and values and
returns values. It may import the standard library, ``cryptography``, ``croniter`` (the
cron schedules) and ``pydantic`` (the policy overrides' validation) only, and no other
part of rotator. Inside it, `registration` (the keyset rules) stands on the registry
`entry` format; it, `lifecycle` and `roles` sit above `overrides`, overrides above
`policy`, policy on the documents (`state`, `jwk`, `envelope` and their canonical
`encoding`, which know each other), and those on the helpers (`strictjson`,
`durations`, `instants`, `issuer`), which import nothing of rotator.
"""
