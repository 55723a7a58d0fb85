"""The long-running process: lead a share of the shards (`rotator.storage.lease`),
reconcile their key sets on a tick, and wake up exactly when a rotation or expiry falls due.

All decisions are made by `lifecycle` from timestamps in the state, so the
scheduler only decides *when to look*: a missed tick, a restart or a clock
jump costs nothing but a late look, never a double rotation. A daemon writes
only the key sets of the shards it leads; it reads every other key set's commits
as announced on ``P:events`` and each key set once per paced sweep
(`rotator.daemon.sweep`) so that, should it take their shards over, it holds a
copy to restore if Redis lost its data. Jobs run one at a time on a single worker
thread (the lease has its own, so a slow tick cannot let the lease lapse); the events
thread reads an announced commit between them: `Daemon.manager_lock` guards the manager, the
registry view and the remembered states, which a tick and an announced commit
both use. SIGTERM/SIGINT let the job in flight finish its commit, release the
lease, and exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import FrameType
from typing import get_args

import redis
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from rotator.config import Settings, mask_url
from rotator.core.lifecycle import Reason
from rotator.core.policy import Policy
from rotator.core.state import CorruptState, KeySetState
from rotator.core.strictjson import one_line
from rotator.daemon.backup import Backup, BackupInUse
from rotator.daemon.health import Health, HealthServer
from rotator.daemon.manager import KEYSET_ERRORS, KeyManager, Outcome
from rotator.daemon.sweep import Sweep
from rotator.daemon.systemd import notify, watchdog_seconds
from rotator.metrics import KeysetCollector, KeysetSample, register_process_metrics
from rotator.storage.audit import BadAuditEntry
from rotator.storage.events import EventFollower
from rotator.storage.lease import Lease, SlowTicks, Verdict
from rotator.storage.registry import KeySetEntry, KeySets
from rotator.storage.store import BATCH_SIZE
from rotator.storage.wiring import Wiring

__all__ = ["Daemon"]

#: The rotation reasons rotator writes (`rotator.core.lifecycle.Reason`).
_REASONS = frozenset(get_args(Reason))
log = logging.getLogger(__name__)

_FRESHNESS_TICKS = 3

#: Key sets a tick takes from the due index at most; more due wake the next tick at once.
_DUE_LIMIT = 4 * BATCH_SIZE

#: Seconds between tries of a backup save that keeps failing, at most (from one tick up).
_BACKUP_RETRY_MAX = 300.0


def _described(exc: Exception) -> str:
    """What failed one key set, in one line: an error that is not one of the expected kinds
    (a bug a key set's data ran into) names its type."""
    text = str(exc) if isinstance(exc, KEYSET_ERRORS) else f"{type(exc).__name__}: {exc}"
    return one_line(text)


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the gauges say of a key set's last seen state: when its current key started
    signing, how many keys it publishes, the policy it was seen under and that policy's
    rotation period for its current key (the numbers, not the state: holding the state of
    every key set was most of a daemon's memory)."""

    activated: float
    published: int
    policy: Policy
    period: float


@dataclass(frozen=True, slots=True)
class _Shards:
    """The usable key sets of the shards *led* (or, not *mine*, of the others) as a
    container: a name is asked of the registry view and its shard, where a set of every
    name held 105 bytes a key set (tracemalloc, 20,000 key sets)."""

    keysets: KeySets
    unusable: Mapping[str, str]
    shard_of: Callable[[str], int]
    led: frozenset[int]
    mine: bool

    def __contains__(self, name: object) -> bool:
        return (
            isinstance(name, str)
            and name in self.keysets
            and name not in self.unusable
            and (bool(self.led) and self.shard_of(name) in self.led) == self.mine
        )


#: Key sets as a tick takes them: sorted, and as a container.
_Split = tuple[list[str], _Shards]


def _activated(state: KeySetState) -> float:
    """When the current key of *state* started signing."""
    return state.current.activated_at or state.updated_at


class Daemon:
    """Keeps the configured and registered key sets rotated. *wiring*: the process's, of
    which *manager* and *keysets* were built (its metric objects are the ones `run`
    registers, so a manager of another wiring times its commits into a histogram that no
    ``/metrics`` shows); by default one of *settings*, for tests that build their own."""

    def __init__(
        self,
        settings: Settings,
        manager: KeyManager,
        keysets: KeySets,
        *,
        wiring: Wiring[Settings] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        wiring = wiring or Wiring(settings)
        self.settings = settings
        self._wiring = wiring
        self.manager = manager
        # The store the manager commits through: the digests and parsed states it holds
        # are what a tick's sweep compares Redis with, so the tick reads through it too.
        self.store = manager.store
        self.managed = keysets
        self.clock = clock
        daemon = settings.daemon
        self.health = Health(freshness=_FRESHNESS_TICKS * daemon.tick)
        self.lease = Lease(wiring.lease_client, wiring.layout, daemon.lease_ttl)
        self.health.shard_count = wiring.layout.shards
        self._slow_ticks = SlowTicks(daemon.tick)
        self._outage = threading.Lock()
        # Held by a tick (scheduler thread) and by `on_commit` (events thread): the manager's
        # remembered states and the registry view are not thread-safe.
        self.manager_lock: AbstractContextManager[object] = threading.Lock()
        self.backup = Backup(daemon.backup_path) if daemon.backup_path else None
        if self.backup is not None:
            manager.keep_on_disk(self.backup.read)
        # After a failed save: when to try again, and the wait that was set.
        self._backup_retry: tuple[float, float] | None = None
        self.stopping = threading.Event()
        self._errors: dict[str, str] = {}
        self._redis_was_down = False
        # The last state seen per key set, with the policy it was seen under and its
        # rotation period, read by the gauges when scraped.
        self._states: dict[str, _Seen] = {}
        self.keyset_metrics = KeysetCollector(self._samples)
        #: The daemon's counters and gauges, from its wiring's metric objects.
        self.metrics = wiring.metrics.daemon
        self._ready_sent = False
        self._watchdog = watchdog_seconds()
        self._audit_seen: str | None = None
        self._tick_failure: str | None = None
        # The due index (a leader): the epoch of each shard led when last read, when the
        # next full sweep falls due, and each key set's registry entry when last looked at
        # (a new or changed one is looked at, and refiled, at the next tick).
        self._epoch: dict[int, int | None] = {}
        self._sweep = Sweep(daemon.sweep_interval)
        # The same for the key sets of the shards this daemon follows (reads, not leads).
        self._followed_epoch: dict[int, int | None] = {}
        self._follow_sweep = Sweep(daemon.sweep_interval)
        self._subscribed_before = False
        self._looked: dict[str, KeySetEntry | None] = {}
        self._announced: set[str] = set()  # commits announced since the last tick
        # When the last leader's tick read the due index (`_to_look_at`).
        self._looked_at = 0.0
        # The registry's version when it was last read in full, and when (None: never).
        self._registry_version: int | None = None
        self._registry_read_at: float | None = None
        # Per registry generation and shards led: the usable names of the shards led and
        # of the others (a CRC16 a name, 0.08 s per 100,000, not paid every tick).
        self._split: tuple[tuple[int, frozenset[int]], _Split, _Split] | None = None
        self._forgotten = -1  # the registry generation `_forget` last ran for
        # The names whose entry in `_looked` is not their registry entry (new, or changed
        # since looked at), per registry generation, kept current as ticks look.
        self._unlooked: set[str] | None = None
        self._unlooked_generation = -1
        self._unlooked_peak = 0  # its size when last made: a set never shrinks its table
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1), "lease": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    def keysets(self) -> list[str]:
        """Key sets this daemon manages: the config's plus the registry's, read now."""
        # On a Redis error keep the last known registry; the tick reports Redis as down.
        with contextlib.suppress(redis.RedisError):
            self._refresh()
        return self.managed.names()

    def _refresh(self) -> None:
        """Read the whole registry, and write back what vanished from it (a leader)."""
        lost = self.managed.refresh()
        if lost and self.lease.held:
            for name, policy in sorted(lost.items()):
                log.warning("key set %s: gone from the registry (Redis lost data); "
                            "writing it back", name)  # fmt: skip
                self.managed.write_back(name, policy)

    def _registry_stale(self, version: int | None, now: float, led: frozenset[int]) -> bool:
        """Whether a tick over the shards *led* reads the whole registry: never read yet,
        its *version* moved (or vanished, or went backwards) since, a sweep of everything
        is pending (of the shards led, or of the others), or a sweep period passed since
        the last read. A hand edit of the hash that leaves the version alone is found by
        that last one."""
        read_at = self._registry_read_at
        return (
            read_at is None
            or version != self._registry_version
            or (bool(led) and self._sweep.pending)
            or (len(led) < self.store.layout.shards and self._follow_sweep.pending)
            or now - read_at >= self.settings.daemon.sweep_interval
        )

    def restore_backup(self) -> None:
        """Seed memory from the backup file, if one is configured."""
        if self.backup is None:
            return
        contents = self.backup.load()
        if contents.states:
            count = len(contents.states)
            log.info("backup file %s: %d key set(s) loaded", self.backup.path, count)
            self.manager.seed(contents.states, contents.lineages)

    def step_lease(self) -> bool:
        """Step the shard leases; on taking a shard, look at every key set led at once. The
        lease's calls are bounded, so this is also where an unreachable Redis is noticed
        first, while a tick may still wait on its own calls."""
        was = self.lease.led
        leader = self.lease.refresh()
        if self.lease.unreachable is not None:
            self._redis_failed(self.lease.unreachable)
        led = self.lease.led
        self._leading(led)
        if led - was and not self.stopping.is_set():
            self._sweep.now()
            self._wake_at(self.clock())
        return leader

    def _leading(self, led: frozenset[int]) -> None:
        """Health and gauges: this daemon leads *led*."""
        self.health.shards = tuple(sorted(led))
        self.health.leader = bool(led)
        self.metrics.leader.set(1 if led else 0)
        self.metrics.shards_led.set(len(led))

    def timed_tick(self) -> None:
        """`tick`, timed: a leader whose ticks keep taking longer than ``daemon.tick`` steps
        down once, or says why it keeps the lease (`rotator.lease.SlowTicks`)."""
        leader = self.lease.held
        started = time.monotonic()
        self.tick()
        took = time.monotonic() - started
        verdict = self._slow_ticks.finished(took, leader=leader and self.lease.held)
        if verdict is Verdict.STEP_DOWN:
            ttl = self.settings.daemon.lease_ttl
            log.warning(
                "ticks take longer than daemon.tick (%d in a row, the last %.1fs > %gs): "
                "stepping down for %gs so that a replica with a faster path to Redis leads",
                self._slow_ticks.needed,
                took,
                self.settings.daemon.tick,
                ttl,
            )
            self.lease.step_down(ttl)
            self._leading(frozenset())
        elif verdict is Verdict.STAY:
            log.warning(
                "ticks still take longer than daemon.tick (the last %.1fs > %gs), and the "
                "lease came back to this replica after it stepped down: no other replica "
                "leads faster, so it keeps the lease until the ticks are fast again",
                took,
                self.settings.daemon.tick,
            )

    def tick(self) -> None:
        """Reconcile (leader) or observe (follower) every key set once, then schedule the
        next precise wake-up. Never raises: a failure that is no one key set's is logged
        (once while it repeats) and the next tick tries again, with the watchdog fed."""
        try:
            with self.manager_lock:
                try:
                    self._tick()
                finally:
                    # Also when the tick ended early (Redis unreachable, stopping): what it
                    # committed before is saved, which needs no Redis.
                    self.save_backup()
        except Exception as exc:  # the last line: no tick dies of data
            failure = f"{type(exc).__name__}: {exc}"
            if failure != self._tick_failure:
                log.exception("tick failed; the next one tries again")
                self._tick_failure = failure
        else:
            self._tick_failure = None
        # Whatever the tick came to, Redis unreachable included: the process is alive and
        # retrying, and a restart by systemd's watchdog would change nothing.
        self._notify(self.managed.names(), self.lease.held)

    def _probe(self, led: frozenset[int]) -> None:
        """The start of a tick over the shards *led*: one round trip reads the registry's
        version and every shard's epoch; a lost epoch asks its sweep to take everything,
        and the whole registry is read only when `_registry_stale` (kept as last known
        when that read fails: the tick's next call reports Redis). Then what is no longer
        managed is forgotten and the unusable key sets reported."""
        store = self.store
        now = self.clock()
        version, epochs = store.probe(range(store.layout.shards))
        if led and store.indexed:
            mine = {shard: epochs[shard] for shard in sorted(led)}
            self._epoch = self._check_epochs(mine, self._epoch, self._sweep)
        if store.indexed:
            others = {shard: epoch for shard, epoch in epochs.items() if shard not in led}
            self._followed_epoch = self._check_epochs(
                others, self._followed_epoch, self._follow_sweep
            )
        if self._registry_stale(version, now, led):
            with contextlib.suppress(redis.RedisError):
                self._refresh()
                # Created where absent (a registry written by hand or by an older
                # release), so that losing it later is seen; if a writer created it
                # meanwhile, the next tick sees it differ and reads again.
                if version is None and store.start_registry_version():
                    version = 0
                self._registry_version, self._registry_read_at = version, now
        generation = self.managed.generation
        if generation != self._forgotten:
            self._forget(set(self.managed.names()))
            self._forgotten = generation
        for name, problem in self.managed.problems().items():
            self._keyset_failed(name, problem)

    def _tick(self) -> None:
        store = self.store
        led = self.lease.led
        leader = bool(led)
        indexed = leader and store.indexed
        try:
            self._probe(led)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._redis_failed(exc)
            return
        split_mine, split_others = self._split_by_shard(led)
        (all_mine, _), (all_others, _) = split_mine, split_others
        mine, others = all_mine, all_others
        sweep = True
        try:
            if indexed:
                mine, sweep = self._to_look_at(split_mine, led)
            if store.indexed:
                others = self._to_observe(split_others, led)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._redis_failed(exc)
            return
        due: list[float] = []
        committed = False
        looked: list[str] = []
        batches = [(mine[i : i + BATCH_SIZE], True) for i in range(0, len(mine), BATCH_SIZE)]
        batches += [(others[i : i + BATCH_SIZE], False) for i in range(0, len(others), BATCH_SIZE)]
        for batch, reconciled in batches:
            if self.stopping.is_set():
                return
            try:
                results = (
                    self.manager.reconcile_many(batch)
                    if reconciled
                    else self.manager.observe_many(batch)
                )
                if indexed and reconciled:
                    self._refile(results, sweep=sweep)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._redis_failed(exc)
                return
            committed = self._took(results, due, looked) or committed
            if self._save_now():
                self._save_backup()
        if store.indexed:
            self._followed_healthy(all_others)
        if indexed:
            self._index_looked(looked, led, all_mine, sweep=sweep or committed, due=due)
        self._sweeps_done()
        self.count_rotations()
        if due and leader:
            self._wake_at(min(due))

    def _save_now(self) -> bool:
        """Whether to save the backup before the tick's end: a sweep of everything held the
        bytes of every state it let go until then, and the heap kept them after
        (bench/many_keysets.py --backup). Not while saving fails (tried at the tick's end)."""
        return (
            self.backup is not None
            and self._backup_retry is None
            and self.manager.unsaved_count() >= BATCH_SIZE
        )

    def _took(
        self,
        results: Mapping[str, Outcome | KeySetState | Exception | None],
        due: list[float],
        looked: list[str],
    ) -> bool:
        """Record what one batch came to, adding to *due* and *looked* what the leader
        reconciled; whether it committed anything."""
        committed = False
        for name, result in results.items():
            if isinstance(result, Exception):
                self._keyset_failed(name, _described(result), result)
            elif isinstance(result, Outcome):
                self._succeeded(result.keyset, result.state)
                committed = committed or result.action in {"bootstrap", "commit", "restore"}
                due.append(self.manager.next_change_at(result.state))
                looked.append(result.keyset)
            else:
                self._followed(name, result)
        return committed

    def _sweeps_done(self) -> None:
        """A tick ended now: a sweep of everything it took counts its period from here."""
        ended = self.clock()
        self._sweep.done(ended)
        self._follow_sweep.done(ended)

    def _split_by_shard(self, led: frozenset[int]) -> tuple[_Split, _Split]:
        """The usable key sets of the shards *led* and of the others (each sorted, and as a
        set), computed once per registry generation and shards led. What this daemon leads
        it reconciles; the rest it reads, as a follower does, so that it holds a copy to
        restore should it take those shards over."""
        key = (self.managed.generation, led)
        if self._split is None or self._split[0] != key:
            unusable = self.managed.problems()
            shard_of = self.store.layout.shard_of
            mine: list[str] = []
            others: list[str] = []
            for name in self.managed.names():  # one CRC16 of its key a name
                if name not in unusable:
                    (mine if led and shard_of(name) in led else others).append(name)
            of = _Shards(self.managed, unusable, shard_of, led, mine=True)
            self._split = (key, (mine, of), (others, replace(of, mine=False)))
        return self._split[1], self._split[2]

    def _index_looked(
        self,
        looked: list[str],
        led: frozenset[int],
        all_mine: list[str],
        *,
        sweep: bool,
        due: list[float],
    ) -> None:
        """After a leader's tick over the shards *led* (whose usable key sets are
        *all_mine*): remember what it *looked* at, count the key sets it did not look at
        healthy, read the epochs anew after a *sweep* or a commit, and add the earliest due
        time filed to *due*."""
        for name in looked:
            self._look(name)
        # What the index says is not due was healthy when last looked at, and no commit
        # since (the epoch would have moved it into the index) says otherwise.
        errors = self._errors
        healthy = [n for n in all_mine if n not in errors] if errors else all_mine
        self.health.succeeded_many(healthy, self.clock())
        shards = sorted(led)
        with contextlib.suppress(redis.RedisError):  # the next tick reports it
            if sweep:
                # What this tick wrote is no loss to detect at the next.
                self._epoch = self.store.epoch(shards, start=True)
            # After the moment this tick read the index: what fell due since is woken for.
            earliest = self.store.earliest_due(shards, after=self._looked_at)
            if earliest is not None:
                due.append(earliest)

    def _to_look_at(self, split: _Split, led: frozenset[int]) -> tuple[list[str], bool]:
        """The key sets of the shards *led* that a leader's tick reconciles (*split* holds
        all of them, as `_split_by_shard` gives them), and whether a sweep is among them:
        all on taking a shard, after an outage and when a shard's epoch went backwards or
        vanished (Redis lost data); else this tick's share of the paced sweep (`Sweep`),
        those the shards' due indexes say are due, those new or whose policy changed since
        last looked at, those that failed and those whose commit was announced."""
        store = self.store
        now = self._looked_at = self.clock()
        shards = sorted(led)
        names, managed = split
        announced, self._announced = self._announced, set()
        swept, whole = self._sweep.take(names, now)
        if whole:
            return swept, True
        # Of the share, only those whose bytes or due entry differ from what is held.
        swept = store.changed(swept, due=True)
        filed, more = store.due(shards, now, _DUE_LIMIT)
        if more:
            self._wake_at(now)  # more are due: the next batch right after this one
        # Filed but no longer managed, or filed in another shard's index (the number of
        # shards changed): dropped from that index.
        stale: dict[int, list[str]] = {}
        for shard, name in filed:
            if name not in managed or store.layout.shard_of(name) != shard:
                stale.setdefault(shard, []).append(name)
        for shard, gone in stale.items():
            store.unindex(gone, shard)
        wanted = {name for _shard, name in filed if name in managed}
        wanted.update(name for name in self._not_looked_at() if name in managed)
        wanted.update(name for name in self._errors if name in managed)
        wanted.update(name for name in announced if name in managed)
        wanted.update(swept)
        return sorted(wanted), bool(swept)

    def _check_epochs(
        self, epochs: dict[int, int | None], known: Mapping[int, int | None], sweep: Sweep
    ) -> dict[int, int | None]:
        """*epochs*, just read; *sweep* is asked to take everything when one went
        backwards or vanished since *known* (Redis lost data)."""
        store = self.store
        for shard, epoch in epochs.items():
            before = known.get(shard)
            if before is not None and (epoch is None or epoch < before):
                log.warning(
                    "%s went from %d to %s: Redis lost data; looking at every key set",
                    store.layout.epoch(shard),
                    before,
                    "nothing" if epoch is None else epoch,
                )
                sweep.now()
        return epochs

    def _to_observe(self, split: _Split, led: frozenset[int]) -> list[str]:
        """The key sets of the shards not *led* that a tick reads (*split* holds all of
        them):
        its share of their paced sweep (all of it when one of their epochs was lost, or the
        subscription came back), those new or whose policy changed since last read, and
        those that failed. An announced commit was read when announced (`on_commit`), so
        the copy to restore from stays current without reading every key set each tick."""
        if not led:
            self._announced.clear()  # read when announced; queued only for shards led
        names, managed = split
        swept, whole = self._follow_sweep.take(names, self.clock())
        if not whole:
            swept = self.store.changed(swept)
        wanted = set(swept)
        wanted.update(name for name in self._not_looked_at() if name in managed)
        wanted.update(name for name in self._errors if name in managed)
        return sorted(wanted)

    def _followed(self, name: str, state: KeySetState | None) -> None:
        """A key set of a shard not led was read: *state*, or ``None`` while it is empty (a
        follower sees an empty set until it is bootstrapped), then read again at the next
        tick and not fresh meanwhile."""
        if state is None:
            self._looked.pop(name, None)
            if self._unlooked is not None:
                self._unlooked.add(name)
            return
        self._succeeded(name, state)
        self._look(name)

    def _look(self, name: str) -> None:
        """*name* was looked at under its registry entry of now."""
        entry = self.managed.get(name)
        self._looked[name] = entry
        if self._unlooked is not None:
            self._unlooked.discard(name)

    def _not_looked_at(self) -> set[str]:
        """The key sets not looked at under their registry entry of now (new, or whose entry
        changed), and maybe some no longer managed: computed once per registry
        generation, then kept current by `_look` and `_followed`."""
        generation = self.managed.generation
        if self._unlooked is None or self._unlooked_generation != generation:
            get = self.managed.get
            self._unlooked = {n for n in self.managed.names() if self._looked.get(n) is not get(n)}
            self._unlooked_generation = generation
            self._unlooked_peak = len(self._unlooked)
        elif len(self._unlooked) <= self._unlooked_peak // 4:
            # Every name is unlooked at start and looked at within a tick or two: the table
            # sized for them all was 105 bytes a key set kept for nothing (tracemalloc).
            self._unlooked = set(self._unlooked)
            self._unlooked_peak = len(self._unlooked)
        return self._unlooked

    def _followed_healthy(self, all_others: list[str]) -> None:
        """Count the key sets of the shards not led (*all_others*, the usable ones) that
        this tick did not read healthy when they were the last time they were read (not
        empty, not failed), and no announced commit or epoch move says otherwise."""
        looked, errors = self._looked, self._errors
        self.health.succeeded_many(
            [n for n in all_others if n in looked and n not in errors], self.clock()
        )

    def _refile(self, results: Mapping[str, object], *, sweep: bool) -> None:
        """File in the due index what a tick looked at and did not commit (a commit filed
        its own): all of it after a due look, what the index has wrong after a sweep."""
        unchanged = [
            result.state
            for result in results.values()
            if isinstance(result, Outcome) and result.action in {"unchanged", "republish"}
        ]
        if sweep and unchanged:
            scores = self.store.due_scores([state.keyset for state in unchanged])
            unchanged = [
                state
                for state, score in zip(unchanged, scores, strict=True)
                if score != self.manager.next_change_at(state)
            ]
        self.store.reindex(unchanged)

    def _notify(self, names: list[str], leader: bool) -> None:
        ready = self.health.ready(self.clock())
        status = (
            f"STATUS={'leader' if leader else 'follower'}, {len(names)} key set(s), "
            f"{'ready' if ready else 'not ready'}"
        )
        if ready and not self._ready_sent:
            self._ready_sent = notify("READY=1", status)
        else:
            notify(status)
        if self._watchdog is not None:
            notify("WATCHDOG=1")

    def save_backup(self, *, now: bool = False) -> None:
        """Save what moved on to the backup file, if one is configured (see `_save_backup`);
        *now*: even within the wait after a failed save (the daemon stopping)."""
        if self.backup is not None:
            self._save_backup(now=now)

    def _save_backup(self, *, now: bool = False) -> None:
        """Write to the backup file what the daemon remembers that moved on since the last
        save: a commit, a newer version read (a repair made while the daemon was stopped,
        which its backup must not undo later), a key set forgotten. The whole file at the
        first save and whenever it is not the file this process wrote (see `Backup`)."""
        backup, manager = self.backup, self.manager
        assert backup is not None
        at = self.clock()
        # A failed save is tried again after a wait that doubles up to `_BACKUP_RETRY_MAX`
        # (a full disk is not rewritten, nor logged, every tick), changes or none; a wait
        # longer than it was set for means the clock was stepped back.
        retry = self._backup_retry
        if retry is not None and not now and at < retry[0] <= at + retry[1]:
            return
        try:
            if not backup.current():
                if not manager.remembered_any():
                    return
                # Streamed: a list of every state would be one more copy of them all.
                backup.save(manager.each_remembered(), manager.lineage_of)
            else:
                states, forgotten = manager.unsaved()
                if not states and not forgotten:
                    return
                backup.update(states, forgotten, manager.lineage_of)
        except OSError as exc:
            wait = (
                self.settings.daemon.tick if retry is None else min(retry[1] * 2, _BACKUP_RETRY_MAX)
            )
            self._backup_retry = (at + wait, wait)
            log.error(
                "cannot write backup file %s: %s (tried again in %gs)", backup.path, exc, wait
            )
            return
        if retry is not None:
            log.info("backup file %s written again", backup.path)
        self._backup_retry = None
        manager.saved()

    def _succeeded(self, name: str, state: KeySetState) -> None:
        if self._redis_was_down:
            log.info("Redis is reachable again")
            self._redis_was_down = False
        if self._errors.pop(name, None) is not None:
            log.info("key set %s: healthy again", name)
        self._seen(state)

    def _seen(self, state: KeySetState) -> None:
        """*state* was reconciled or read just now: health and metrics."""
        self.health.succeeded(state.keyset, self.clock())
        entry = self.managed.get(state.keyset)
        if entry is None or entry.policy is None:
            return  # an announced commit under an unusable policy: the tick reports it
        known = self._states.get(state.keyset)
        activated, published = _activated(state), len(state.keys)
        if known is None or known.activated != activated or known.policy is not entry.policy:
            # Once per current key: a cron schedule's period costs two croniter calls.
            period = entry.policy.rotation_period(activated)
            self._states[state.keyset] = _Seen(activated, published, entry.policy, period)
        elif known.published != published:
            self._states[state.keyset] = _Seen(activated, published, known.policy, known.period)

    def _samples(self) -> Iterator[KeysetSample]:
        """The per key set gauges, computed when /metrics is scraped."""
        now = self.clock()
        for name, seen in list(self._states.items()):
            yield KeysetSample(
                keyset=name,
                last_reconcile=self.health.last_success(name) or 0.0,
                current_key_age=now - seen.activated,
                published_keys=seen.published,
                rotation_interval=seen.period,
            )

    def _forget(self, managed: set[str]) -> None:
        """Drop health, metrics and memory of key sets no longer managed."""
        self.health.forget(managed)
        for name in self.managed.removed:
            self.manager.forget(name)
        for name in set(self._states) - managed:
            del self._states[name]
        for name in set(self._looked) - managed:
            del self._looked[name]

    def count_rotations(self) -> None:
        """Count rotations recorded in the audit stream since the last look (every
        replica counts every rotation, whoever made it: daemon or CLI)."""
        audit = self.manager.audit
        if audit is None:
            return
        try:
            if self._audit_seen is None:
                self._audit_seen = audit.last_id()
                return
            unreadable: list[BadAuditEntry] = []
            for entry in audit.since(self._audit_seen):
                self._audit_seen = entry.id
                if isinstance(entry, BadAuditEntry):
                    unreadable.append(entry)
                elif entry.event == "rotate" and entry.keyset in self.managed:
                    # Labels bounded by what is managed and by the reasons rotator writes:
                    # forged entries made a series each, without end (RSS, /metrics).
                    reason = entry.reason or "scheduled"
                    label = reason if reason in _REASONS else "other"
                    self.metrics.rotations.labels(entry.keyset, label).inc()
        except (redis.RedisError, OSError):
            self.metrics.redis_errors.inc()
            return
        if unreadable:
            log.warning(
                "audit stream: %d unreadable entr%s not counted (%s)",
                len(unreadable),
                "y" if len(unreadable) == 1 else "ies",
                unreadable[0],
            )

    def _redis_failed(self, exc: Exception) -> None:
        self.metrics.redis_errors.inc()
        self.health.redis_down()
        # Whatever Redis came back with, look at all of it.
        self._sweep.now()
        self._follow_sweep.now()
        with self._outage:  # the lease's thread and the tick's both report
            if not self._redis_was_down:
                log.warning("Redis is unreachable (%s); retrying every tick", exc)
                self._redis_was_down = True

    def _keyset_failed(self, name: str, message: str, error: Exception | None = None) -> None:
        self.health.failed(name, message)
        if self._errors.get(name) != message:
            unexpected = error is not None and not isinstance(error, KEYSET_ERRORS)
            log.error(
                "key set %s: skipped: %s", name, message, exc_info=error if unexpected else None
            )
            self._errors[name] = message

    def _wake_at(self, when: float) -> None:
        if when - self.clock() >= self.settings.daemon.tick:
            return  # the regular tick comes first
        run_at = datetime.fromtimestamp(max(when, self.clock()), UTC)
        self._scheduler.add_job(
            self.timed_tick, DateTrigger(run_at), id="wake", replace_existing=True, name="wake"
        )

    def on_commit(self, keyset: str) -> None:
        """A commit was announced (by any writer, the CLI included): read it now rather than
        at the next tick, so that a restore after Redis loses data carries it, a
        revocation above all."""
        try:
            with self.manager_lock:
                self._observe(keyset)
        except Exception:  # the last line: the events thread must not die of data
            log.exception("key set %s: reading the announced commit failed", keyset)

    def _observe(self, keyset: str) -> None:
        if keyset not in self.managed or self.stopping.is_set():
            return
        # The leader's next tick reconciles it (a JWKS deleted with an event published gets
        # written back then), due or not.
        self._announced.add(keyset)
        try:
            state = self.manager.observe(keyset)
            if state is None:  # emptied: removed with `rotator keyset remove`, or data lost
                self.managed.refresh()
        except (redis.RedisError, CorruptState):
            return  # the tick will report it
        if state is not None:
            self._seen(state)
        elif keyset not in self.managed:
            self._forget(set(self.managed.names()))

    def on_subscribed(self) -> None:
        """The events subscription is (re)established: after the first, commits announced
        while it was down were missed, so the next tick looks at every key set."""
        if self._subscribed_before:
            self._sweep.now()
            self._follow_sweep.now()
        self._subscribed_before = True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing the commit in flight", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        daemon = self.settings.daemon
        if self.backup is not None:
            try:
                self.backup.claim()
            except BackupInUse as exc:
                log.error("daemon.backup_path: %s", exc)
                return 1
            except OSError as exc:
                # A directory missing or read-only fails every save too, said then: the
                # backup is the second line of defence, and rotating goes on without it.
                log.error(
                    "daemon.backup_path: cannot lock %s.lock (%s); going on without the lock",
                    self.backup.path,
                    exc.strerror or exc,
                )
        self.restore_backup()
        register_process_metrics(self._wiring.metrics, keysets=self.keyset_metrics)
        server = None
        if daemon.health_port:
            try:
                server = HealthServer(
                    daemon.health_host, daemon.health_port, self.health, self.clock
                )
            except OSError as exc:
                # As `rotator serve` does for its port: one line naming it, exit 1.
                log.error(
                    "cannot listen on %s:%d (daemon.health_port): %s",
                    daemon.health_host,
                    daemon.health_port,
                    exc.strerror or exc,
                )
                return 1
            server.start()
            log.info("health on http://%s:%d/readyz", daemon.health_host, server.port)
        lease_every = daemon.lease_ttl / 3
        now = datetime.now(UTC)
        self._scheduler.add_job(
            self.step_lease,
            IntervalTrigger(seconds=lease_every, jitter=lease_every / 10),
            id="lease",
            name="lease",
            executor="lease",
            next_run_time=now,
        )
        self._scheduler.add_job(
            self.timed_tick,
            IntervalTrigger(seconds=daemon.tick, jitter=daemon.tick / 10),
            id="tick",
            name="tick",
            next_run_time=now,
        )
        self._scheduler.start()
        follower = EventFollower(
            self._wiring.client,
            self._wiring.layout.events,
            on_event=self.on_commit,
            on_poll=lambda: None,  # the paced sweep reads everything once a sweep period
            on_connect=self.on_subscribed,
            poll_interval=3600,
            name="rotator-daemon-events",
        )
        follower.start()
        with self.manager_lock:  # the first tick may be running already
            names = self.keysets()
        log.info(
            "rotator daemon started: key sets %s, tick %gs, Redis %s",
            ", ".join(names) or "(none)",
            daemon.tick,
            mask_url(self.settings.redis.url),
        )
        if self._watchdog is not None and daemon.tick > self._watchdog / 2:
            log.warning(
                "daemon.tick (%gs) is more than half of the systemd watchdog (%gs): "
                "systemd may kill a healthy daemon",
                daemon.tick,
                self._watchdog,
            )
        self.stopping.wait()
        notify("STOPPING=1", "STATUS=stopping")
        follower.stop()
        self._scheduler.shutdown(wait=True)
        with self.manager_lock:  # what the events thread read since the last tick
            self.save_backup(now=True)
        self.lease.release()
        if server is not None:
            server.stop()
        log.info("rotator daemon stopped")
        return 0
