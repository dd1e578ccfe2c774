"""The claim rules of fixed-partition generators (``pipeline.generate.claims.holders``), on records.

The fold decides from the records alone, so every reader agrees: the first live claim in log
order wins, a restart of the same worker id takes over at once, a lapsed or released claim
holds nothing, and a claim gets all its partitions or none.
"""

from __future__ import annotations

import os

from pipeline.core.messages import PartitionClaim
from pipeline.generate.claims import default_worker_id, holders

LEASE = 18.0


def claim(worker: str, instance: str, partitions: list[int], at: float, **fields: object) -> PartitionClaim:
    values = {"heartbeat_at": at, "state": "held", **fields}
    return PartitionClaim(
        run_id="r", worker_id=worker, instance_id=instance, partitions=partitions, host="h", pid=1,
        claimed_at=at, lease_s=LEASE, **values,  # type: ignore[arg-type]
    )  # fmt: skip


def owners(records: list[tuple[int, PartitionClaim]], now: float | None = None) -> dict[int, str]:
    return {p: c.instance_id for p, c in holders(records, now).items()}


def test_the_first_claim_in_log_order_wins_and_the_loser_holds_nothing() -> None:
    records = [(0, claim("a", "a1", [0, 1], 100.0)), (1, claim("b", "b1", [1, 2], 100.5))]
    assert owners(records) == {0: "a1", 1: "a1"}  # b gets neither 1 nor 2: all or none


def test_a_restart_with_the_same_id_takes_over_without_waiting_for_the_lease() -> None:
    records = [(0, claim("a", "a1", [0, 1], 100.0)), (1, claim("a", "a2", [0, 1], 101.0))]
    assert owners(records, now=101.5) == {0: "a2", 1: "a2"}
    # ...and a later, still-live renewal of the superseded instance changes nothing.
    records.append((2, claim("a", "a1", [0, 1], 100.0, heartbeat_at=102.0, claimed_offset=0)))
    assert owners(records, now=102.5) == {0: "a2", 1: "a2"}


def test_a_lapsed_or_released_claim_leaves_the_partitions_free() -> None:
    lapsed = [(0, claim("a", "a1", [0], 100.0)), (1, claim("b", "b1", [0], 100.0 + LEASE + 1))]
    assert owners(lapsed) == {0: "b1"}
    assert owners(lapsed[:1], now=100.0 + LEASE + 1) == {}  # nobody holds a lapsed claim
    released = [(0, claim("a", "a1", [0], 100.0)), (1, claim("a", "a1", [0], 100.0, heartbeat_at=105.0,
                                                                 claimed_offset=0, state="released"))]  # fmt: skip
    released.append((2, claim("b", "b1", [0], 106.0)))
    assert owners(released) == {0: "b1"}


def test_a_renewed_claim_stays_live_and_compaction_keeps_the_order() -> None:
    # a1's first record was compacted away; its renewal carries the first claim's offset and time.
    records = [
        (5, claim("b", "b1", [0], 110.0)),  # came after a1's claim and lost: it never wrote refused
        (9, claim("a", "a1", [0], 100.0, heartbeat_at=125.0, claimed_offset=2)),
    ]
    assert owners(records, now=126.0) == {0: "a1"}


def test_a_refused_claim_does_not_supersede_its_own_worker_id() -> None:
    records = [(0, claim("a", "a1", [0, 1], 100.0)), (1, claim("z", "z1", [2], 100.0))]
    records.append((2, claim("a", "a2", [1, 2], 101.0, state="refused")))
    assert owners(records, now=102.0) == {0: "a1", 1: "a1", 2: "z1"}


def test_default_worker_ids() -> None:
    assert default_worker_id([1, 0, 1]) == "gen-p0-1"  # the same set, the same id: a restart fences
    many = default_worker_id(list(range(64)))
    assert many.startswith("gen-p0-63-n64-") and len(many) < 64
    group = default_worker_id(None)
    assert group.endswith(f"-{os.getpid()}") and group != default_worker_id([0])


def test_a_renewal_after_a_lapse_is_a_new_claim_that_comes_after_whoever_claimed_meanwhile() -> None:
    late = 100.0 + LEASE + 5  # the broker was away longer than a1's lease
    records = [(0, claim("a", "a1", [0], 100.0)), (1, claim("b", "b1", [0], 100.0 + LEASE + 1))]
    records.append((2, claim("a", "a1", [0], 100.0, heartbeat_at=late, claimed_offset=0)))
    assert owners(records, now=late) == {0: "b1"}
    # Nobody claimed during the lapse: the late renewal simply holds the partition again.
    alone = [records[0], records[2]]
    assert owners(alone, now=late + 1) == {0: "a1"}
