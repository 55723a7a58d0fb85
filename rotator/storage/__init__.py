"""The Redis side: key names (`layout`), the compare-and-set store, the key set
registry, the audit log, the leader lease and the events channel.

It may import `rotator.core`, redis-py and the leaf modules `rotator.metrics` and
`rotator.logs`; never the library, the configuration or anything above them.
"""
