"""The Redis side: key names (`layout`), the compare-and-set store, the view of the
key set registry (`registry`; the format of its entries and the rules of adding one
are pure, in `rotator.core.entry` and `rotator.core.registration`), the audit log, the
leader lease and the events channel.

It may import `rotator.core`, redis-py, pydantic (the registry entries' validation) and
the leaf modules `rotator.metrics` and `rotator.logs`; never the library, the
configuration or anything above them. Inside it, the registry is above the store, the
store above the lease, and the layout, the connections and the KEK file below the rest
(``.importlinter``).
"""
