"""The daemon: the key manager that applies the lifecycle to stored state, the
scheduler that ticks it under the leader lease, health and metrics endpoints, the
local backup and the systemd notifications.

It may import `rotator.config`, the library, storage and core, and
the leaf modules `rotator.metrics` and `rotator.logs` (the embedded Redis is the CLI's);
never `rotator.serve` or the CLI. Inside it, `scheduler` wires the
others, which do not import each other.
"""
