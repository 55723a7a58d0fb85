"""The Redis side: key names (`layout`), the compare-and-set store, the view of the
key set registry (`registry`; the format of its entries and the rules of adding one
are pure, in `rotator.core.entry` and `rotator.core.registration`), the audit log, the
leader lease, the events channel, and the wiring of them from settings.

It may import `rotator.core`, redis-py and the leaf modules `rotator.metrics` and
`rotator.logs`; never the library, the configuration or anything above them. Inside
it, `wiring` (the one wiring point, settings to objects) is above the registry, the
registry above the store, the store above the lease, and the layout, the connections
and the KEK file below the rest (``.importlinter``).
"""
