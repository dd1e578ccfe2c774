"""Fixed-partition generators claim their prompt partitions, so that two cannot both publish.

In group mode Kafka's group protocol gives every prompt partition one owner and fences the
others (KIP-447). A worker given ``--partitions`` has no such referee: two workers with
overlapping partitions and different worker ids (different transactional ids) would both read
and both commit. Claims are that referee, written and read back through the transport contract.

**Records.** A claim is a :class:`~pipeline.core.messages.PartitionClaim` in the run's compacted
manifest topic, keyed per instance (``claim/<instance_id>``), so compaction keeps each instance's
newest record and never lets one instance's record erase another's. Every record is complete:
worker id, partitions, host and pid, when and at which offset the claim was first made, the newest
heartbeat, the lease, and the state (``held``, ``released`` at a clean exit, ``refused``).

**Rules** (:func:`holders`, a fold that every reader computes alike from the records alone):
instances are taken in the order of their first claim record in the log. A claim of a worker id
supersedes every earlier instance of the same id (a restart: the same transactional id fences
the predecessor at the broker, so its claim ends with it, without waiting for its lease). A
claim gets its partitions, all or none, unless an earlier instance of another worker id held one
of them and was live when the claim was made: not released, and its heartbeat then less than one
lease old. An instance's heartbeats form a chain; a heartbeat that comes more than a lease after
the one before (the broker was away longer than the lease) starts a new claim at its own offset,
so a worker that claimed the partitions meanwhile comes first, and the late one loses them.

**Acquire** reads the claims, refuses at once a partition held by a live instance of another
worker id, then writes its claim, reads the topic to its end again and checks that the fold gives
it every partition: of two simultaneous starts the one whose claim is first in the log wins, and
the other writes ``refused`` and stops with one error line naming the winner. A thread renews the
claim every third of the lease (through a broker outage, up to the outage budget) and reads what
others wrote: superseded by a restart of its own id or overtaken while its lease had lapsed, the
claim is *lost*; a lapse nobody used (the broker was down) is renewed. The worker commits nothing
more while its heartbeat is old (:meth:`PartitionClaims.valid` is part of its writer's staleness
check) and stops once the claim is lost. A holder
counts on its claim only for two thirds of the lease after its last heartbeat, so it stops
committing before anyone else may take over. Clocks of different hosts are compared: the lease
(three session timeouts) must be much longer than their skew.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable

from pipeline.core.errors import DecodeError, PartitionsClaimedError, SpecstreamError
from pipeline.core.messages import PartitionClaim, decode, encode
from pipeline.core.topics import FencedError, RunTopics, Transport, TransportError, read_to_end
from pipeline.generate.config import GeneratorConfig

__all__ = (
    "ClaimLost",
    "NoClaims",
    "PartitionClaims",
    "claim_partitions",
    "default_worker_id",
    "holders",
    "lease_for",
)

logger = logging.getLogger(__name__)

#: A claim lapses this many consumer session timeouts after its last heartbeat.
LEASE_SESSIONS = 3


class ClaimLost(SpecstreamError):
    """While running, another instance took this worker's partitions (see the message)."""


def lease_for(session_timeout_ms: int) -> float:
    """The claim lease of a worker with this consumer session timeout, in seconds."""
    return LEASE_SESSIONS * session_timeout_ms / 1000


def default_worker_id(partitions: list[int] | None) -> str:
    """A worker id when none is given.

    Fixed partitions: derived from the partition set (``gen-p0-1``), so a restart of the same
    assignment reuses the transactional id and fences its predecessor at once. Group mode: unique
    per process (``<host>-<pid>``); the group protocol fences a predecessor, and its open
    transaction is aborted by the broker after ``transaction_timeout_ms``.
    """
    if partitions is not None:
        owned = sorted(set(partitions))
        name = "gen-p" + "-".join(map(str, owned))
        if len(name) > 64:  # many partitions: first, last, count and a digest of the set
            digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
            name = f"gen-p{owned[0]}-{owned[-1]}-n{len(owned)}-{digest}"
        return name
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname()).strip("-._")[:120] or "host"
    return f"{host}-{os.getpid()}"


class NoClaims:
    """A group-mode worker's stand-in: the group protocol referees its partitions."""

    def valid(self) -> bool:
        return True

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def claim_partitions(transport: Transport, config: GeneratorConfig) -> PartitionClaims | NoClaims:
    """Fixed partitions: this instance's claim on them (or ``PartitionsClaimedError``); group
    mode: nothing to claim."""
    if config.partitions is None:
        return NoClaims()
    lease_s = lease_for(config.session_timeout_ms)
    return PartitionClaims.acquire(
        transport, config.run_id, config.worker_id, config.partitions, lease_s=lease_s
    )


def _lapses_at(claim: PartitionClaim) -> float:
    """When a claim stops counting: at its release, else one lease after its newest heartbeat."""
    return claim.heartbeat_at if claim.state != "held" else claim.heartbeat_at + claim.lease_s


def holders(
    records: Iterable[tuple[int, PartitionClaim]], now: float | None = None
) -> dict[int, PartitionClaim]:
    """Partition -> the claim holding it (the module docstring's rules), from (offset, claim)
    records in any order; with ``now``, only the holders still live then."""
    # instance -> (where its unbroken chain starts: offset and time, its newest claim)
    newest: dict[str, tuple[int, float, PartitionClaim]] = {}
    for offset, claim in sorted(records, key=lambda record: record[0]):
        known = newest.get(claim.instance_id)
        if known is None:
            first = claim.claimed_offset if claim.claimed_offset is not None else offset
            newest[claim.instance_id] = (first, claim.claimed_at, claim)
        elif claim.heartbeat_at > _lapses_at(known[2]):  # renewed after a lapse: a new claim from here
            newest[claim.instance_id] = (offset, claim.heartbeat_at, claim)
        else:
            newest[claim.instance_id] = (known[0], known[1], claim)
    held: dict[int, PartitionClaim] = {}
    for _, claimed_at, claim in sorted(newest.values(), key=lambda item: item[0]):
        if claim.state == "refused":
            continue
        for p in [p for p, h in held.items() if h.worker_id == claim.worker_id]:
            del held[p]  # a restart of the same worker id: the broker fenced the predecessor
        if not any(p in held and claimed_at < _lapses_at(held[p]) for p in claim.partitions):
            held.update(dict.fromkeys(claim.partitions, claim))
    if now is not None:
        held = {p: h for p, h in held.items() if now < _lapses_at(h)}
    return held


def _describe(holder: PartitionClaim, now: float) -> str:
    return (
        f"generator {holder.worker_id} (its partitions {','.join(map(str, holder.partitions))}; "
        f"host {holder.host}, pid {holder.pid}, last heartbeat {max(0.0, now - holder.heartbeat_at):.0f} s ago)"
    )


class PartitionClaims:
    """This instance's claim on its fixed partitions: acquired, renewed on a thread, released."""

    def __init__(
        self, transport: Transport, run_id: str, worker_id: str, partitions: list[int], *, lease_s: float
    ) -> None:
        self.transport = transport
        self.topics = RunTopics(run_id)
        self.worker_id = worker_id
        self.partitions = sorted(set(partitions))
        self.lease_s = lease_s
        self.instance_id = uuid.uuid4().hex[:16]
        self._host, self._pid = socket.gethostname()[:255], os.getpid()
        self._records: dict[int, PartitionClaim] = {}  # offset -> claim, of every instance
        self._position = 0  # the next manifest offset to read
        self._first_offset: int | None = None
        self._claimed_at = 0.0
        self._heartbeat = 0.0  # the newest heartbeat known delivered
        self._lost: str | None = None
        self._superseded = False  # by a restart of our worker id: the broker fences us as well
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(
        cls, transport: Transport, run_id: str, worker_id: str, partitions: list[int], *, lease_s: float
    ) -> PartitionClaims:
        """Claim the partitions or raise ``PartitionsClaimedError`` naming who holds them."""
        claims = cls(transport, run_id, worker_id, partitions, lease_s=lease_s)
        claims._acquire()
        return claims

    # --- the claim's life ------------------------------------------------------------------

    def _acquire(self) -> None:
        with self.transport.admin() as admin:
            if self.topics.manifest not in admin.topics():  # topics made without a manifest (tests)
                admin.ensure_run_topics(self.topics, admin.partition_count(self.topics.prompts) or 1)
        self._read_new()
        live = holders(self._records.items(), time.time())
        self._refuse(
            {p: live[p] for p in self.partitions if p in live and live[p].worker_id != self.worker_id}
        )
        self._claimed_at = time.time()
        self._write("held", self._claimed_at)
        self._read_new()
        self._first_offset = next(
            o for o, c in sorted(self._records.items()) if c.instance_id == self.instance_id
        )
        lost = self._not_mine()
        if lost:  # a simultaneous start's claim came first in the log
            self._write("refused", time.time())
            self._refuse(lost)
        logger.info("%s: claimed partitions %s (instance %s, lease %.0f s)",
                    self.worker_id, self.partitions, self.instance_id, self.lease_s)  # fmt: skip
        self._thread = threading.Thread(target=self._renew_loop, name=f"claims-{self.worker_id}", daemon=True)
        self._thread.start()

    def _not_mine(self) -> dict[int, PartitionClaim | None]:
        """Our partitions that the claim rules give to another instance (or to none)."""
        held = holders(self._records.items())
        return {
            p: held.get(p)
            for p in self.partitions
            if p not in held or held[p].instance_id != self.instance_id
        }

    def _refuse(self, blocking: dict[int, PartitionClaim | None]) -> None:
        if not blocking:
            return
        named = [h for _, h in sorted(blocking.items()) if h is not None]
        who = _describe(named[0], time.time()) if named else "a generator whose claim came first"
        lease = named[0].lease_s if named else self.lease_s
        raise PartitionsClaimedError(
            f"generator {self.worker_id} cannot take partitions {','.join(map(str, sorted(blocking)))} of run "
            f"{self.topics.run_id}: they are claimed by {who} (fix: give each generator its own --partitions, or "
            f"stop that generator; a claim lapses {lease:.0f} s after its last heartbeat, and a restart with the "
            "same --worker-id takes over at once)"
        )

    def _renew_loop(self) -> None:
        while not self._closed.wait(self.lease_s / 3):
            try:
                self._renew()
            except (TransportError, DecodeError, OSError) as exc:  # retried on the next tick
                logger.warning("%s: claim not renewed (%s); retrying", self.worker_id, exc)
            except Exception as exc:  # noqa: BLE001 - a claim we cannot keep is a claim we lost
                self._lose(f"its claim could not be renewed: {type(exc).__name__}: {exc}")
            if self._lost is not None:
                return

    def _renew(self) -> None:
        previous = self._heartbeat
        now = time.time()
        self._write("held", now)  # rides out a broker outage (up to the budget)
        self._read_new()
        taken = self._not_mine()  # after a lapse: whoever claimed meanwhile comes first
        if not taken:
            if now > previous + self.lease_s:  # the chain restarted here: later records say so
                self._first_offset = max(o for o, c in self._records.items() if c.instance_id == self.instance_id)
                self._claimed_at = now
                logger.info("%s: claim renewed after a %.0f s gap; no one claimed its partitions meanwhile",
                            self.worker_id, now - previous)  # fmt: skip
            self._heartbeat = now
        if taken:
            named = [h for _, h in sorted(taken.items()) if h is not None]
            same = bool(named) and named[0].worker_id == self.worker_id
            who = _describe(named[0], time.time()) if named else "no one"
            why = "a restart with the same worker id" if same else "another generator"
            self._superseded = same
            self._lose(f"{why} took partitions {sorted(taken)}: now held by {who}")

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
            logger.warning("%s: claim lost: %s", self.worker_id, reason)

    def valid(self) -> bool:
        """Whether a batch may still commit: claim not lost, heartbeat well inside the lease."""
        return self._lost is None and time.time() < self._heartbeat + self.lease_s * 2 / 3

    def check(self) -> None:
        """Raise ``ClaimLost`` once the claim is gone (the worker stops; nothing more commits).

        An old heartbeat alone is not a loss: nothing commits meanwhile (:meth:`valid`), and the
        renewal decides, once the broker answers, whether someone else took the partitions."""
        if self._lost is not None and self._superseded:  # the worker says it as for a fenced producer
            raise FencedError(self._lost, same_id=True)
        if self._lost is not None:
            raise ClaimLost(
                f"generator {self.worker_id} stopped: {self._lost}; it committed nothing after that, "
                "and its open transaction is aborted"
            )

    def release(self) -> None:
        """A clean exit: stop renewing and say so, so another worker may take the partitions now."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self._write("released", time.time())
        except (TransportError, OSError) as exc:  # it lapses with its lease instead
            logger.warning(
                "%s: claim release not written (%s); it lapses in %.0f s", self.worker_id, exc, self.lease_s
            )

    # --- records ---------------------------------------------------------------------------

    def _write(self, state: str, at: float) -> None:
        claim = PartitionClaim(
            run_id=self.topics.run_id, worker_id=self.worker_id, instance_id=self.instance_id,
            partitions=self.partitions, host=self._host, pid=self._pid, claimed_at=self._claimed_at or at,
            claimed_offset=self._first_offset, heartbeat_at=at, lease_s=self.lease_s, state=state,  # type: ignore[arg-type]
        )  # fmt: skip
        producer = self.transport.plain_producer(linger_ms=0)
        try:
            producer.send(
                self.topics.manifest, encode(claim), partition=0, key=f"claim/{self.instance_id}".encode()
            )
            producer.flush()  # raises unless delivered: a claim is only counted on once it is durable
        finally:
            producer.close()
        if state == "held" and self._first_offset is None:
            self._heartbeat = at  # the first claim (renewals set it once checked)

    def _read_new(self) -> None:
        """Add the manifest records since the last read (bounded by ``read_to_end``)."""
        for record in read_to_end(
            self.transport, self.topics.manifest, [0], start={0: self._position}, timeout_s=30
        ):
            self._position = record.offset + 1
            try:
                message = decode(record.value or b"")
            except DecodeError:
                continue  # the run manifest reader's business, not a claim
            if isinstance(message, PartitionClaim) and message.run_id == self.topics.run_id:
                self._records[record.offset] = message
