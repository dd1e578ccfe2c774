"""``specstream audit``: prove from the topics alone that a run lost and repeated nothing.

Reads the run's prompts, samples, ledger and DLQ topics ``read_committed`` (nothing is written)
and reconciles them with the rules every stage follows (``pipeline.core.eos``): the source's
numbered prompts per partition, the generators' numbered sample refs per partition, and the
ledger's effective history of optimizer steps. Per partition and in total it reports prompts
published, refs committed, samples trained once, more than once and never (in each epoch the
ledger names: a run of E epochs counts every ref E times), prompts dead-lettered by the
generators, dead letters by stage and reason, and foreign records.

A loss is a prompt with neither a ref nor a dead letter, or a gap in a partition's numbered refs;
a repeat is a sample trained twice in one epoch, or a trained sample that no committed ref names.
Under a storage budget a sample captured again for a later epoch (the ``<run>.regen`` sub-run)
counts as its prompt's sample in that epoch.
Either makes the audit fail (exit 1). Samples not trained yet (a run stopped by ``max_steps``, or
the tail that cannot fill a global step) are reported, not failed: a resume trains them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.deadletter import stage_of
from pipeline.core.errors import CaptureContractError, DecodeError, OptionError, PayloadError, StreamError
from pipeline.core.features import check_ref
from pipeline.core.messages import DeadLetter, EndOfStream, Prompt, SampleRef, decode, sample_id_for
from pipeline.core.topics import Record, RunTopics, Transport, read_to_end
from pipeline.feature_codec import check_scales
from pipeline.ledger import effective_history, read_ledger
from pipeline.storage import FeatureStore, tensors_from_buffer

__all__ = ("PartitionAudit", "RunAudit", "audit_run", "render_audit")


@dataclass
class PartitionAudit:
    """One partition's reconciliation (prompts partition p feeds samples partition p)."""

    partition: int
    prompts: int = 0
    source_ended: bool = False
    refs: int = 0
    missing_refs: int = 0
    dropped: int = 0
    generators_ended: bool = False
    duplicates: int = 0
    foreign_prompts: int = 0
    foreign_samples: int = 0
    trained_once: int = 0
    trained_repeatedly: int = 0
    never_trained: int = 0

    @property
    def lost(self) -> int:
        """Prompts that became neither a ref nor a dead letter (known once the partition ended)."""
        if not self.generators_ended:
            return self.missing_refs
        return max(0, self.prompts - self.refs - self.dropped) + self.missing_refs


@dataclass
class RunAudit:
    """The whole run: partitions, ledger, dead letters."""

    run_id: str
    partitions: list[PartitionAudit]
    steps: int = 0
    epochs: list[int] = field(default_factory=list)
    unknown_trained: int = 0  # trained sample ids that no committed ref names
    dead_letters: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # one reason per (stage, error)

    def total(self, name: str) -> int:
        return sum(int(getattr(p, name)) for p in self.partitions)

    @property
    def lost(self) -> int:
        return self.total("lost")

    @property
    def repeated(self) -> int:
        return self.total("trained_repeatedly") + self.unknown_trained

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.repeated == 0

    def to_json(self) -> dict[str, Any]:
        """For ``--json``: every count, per partition and in total."""
        names = [n for n in asdict(self.partitions[0]) if n != "partition"] if self.partitions else []
        return {
            "run_id": self.run_id,
            "ok": self.ok,
            "lost": self.lost,
            "repeated": self.repeated,
            "steps": self.steps,
            "epochs": self.epochs,
            "unknown_trained": self.unknown_trained,
            "totals": {n: self.total(n) for n in names},
            "partitions": [{**asdict(p), "lost": p.lost} for p in self.partitions],
            "dead_letters": [
                {"stage": stage, "error": error, "count": n, "example": self.examples[f"{stage}/{error}"]}
                for (stage, error), n in sorted(self.dead_letters.items())
            ],
        }


@dataclass
class _Sequence:
    """One partition's own output as a reader takes it, plus what it set aside."""

    own: list[Any] = field(default_factory=list)
    marker: EndOfStream | None = None
    gaps: int = 0
    duplicates: int = 0
    foreign: int = 0


def _own_sequence(
    records: list[Record],
    run_id: str,
    message_type: type,
    stage: str,
    valid: Callable[[Any], bool] = lambda _: True,
) -> _Sequence:
    """Replay a reader's rules over one partition (``pipeline.core.eos``): the first record that
    carries the next number and passes ``valid`` is the writer's own; the same record again is a
    duplicate; anything else is foreign. ``valid`` is the reader's payload check (refs)."""
    out = _Sequence()
    taken: dict[int, tuple[str, str]] = {}  # seq -> (id, checksum) of the own record
    for record in records:
        try:
            message = decode(record.value or b"")
        except DecodeError:
            out.foreign += 1
            continue
        if message.run_id != run_id or out.marker is not None:
            out.foreign += 1
            continue
        next_seq = len(out.own) + out.gaps
        if isinstance(message, EndOfStream):
            if message.stage == stage and message.seq is not None and message.seq == message.count >= next_seq:
                out.gaps += message.seq - next_seq
                out.marker = message
            else:
                out.foreign += 1
            continue
        if not isinstance(message, message_type) or message.seq is None:
            out.foreign += 1
            continue
        key = (getattr(message, "sample_id", "") or getattr(message, "prompt_id", ""), getattr(message, "checksum", ""))
        if message.seq < next_seq:
            if taken.get(message.seq) == key:
                out.duplicates += 1
            else:
                out.foreign += 1
            continue
        if not valid(message):
            out.foreign += 1
            continue
        out.gaps += message.seq - next_seq
        out.own.append(message)
        taken[message.seq] = key
    return out


def _verifier(store: FeatureStore | None, trained: set[str]) -> Callable[[SampleRef], bool]:
    """The stream's acceptance test for a ref: its declared tensors, then (with a store) its file.

    A file that is gone after the ledger trained its sample was deleted by ``retention: delete``
    once a checkpoint covered it: the trainer verified it then, so the ref counts as the generator's.
    """

    def valid(ref: SampleRef) -> bool:
        try:
            check_ref(ref)
            if store is not None and not (ref.sample_id in trained and not store.exists(ref.uri)):
                check_scales(ref, tensors_from_buffer(store.read_verified(ref)))  # as the trainer's decode does
        except (CaptureContractError, PayloadError):
            return False
        return True

    return valid


def _by_partition(
    transport: Transport, topic: str, partitions: int, timeout_s: float
) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = {p: [] for p in range(partitions)}
    for record in read_to_end(transport, topic, range(partitions), timeout_s=timeout_s):
        out[record.partition].append(record)
    return out


def audit_run(
    transport: Transport, run_id: str, *, store: FeatureStore | None = None, timeout_s: float = 300.0,
    group: str | None = None,
) -> RunAudit:
    """Reconcile the run's topics (``group``: with that trainer group's ledger); raises
    ``StreamError`` when the run has no topics here.

    With the run's ``store``, refs are verified against their files exactly as the trainer does
    (so a stray that claims a number and fails its checks is told from the generator's own ref);
    without it only the refs' declared tensors are checked.
    """
    topics = RunTopics(run_id)
    with transport.admin() as admin:
        count = admin.partition_count(topics.samples)
        regenerated = admin.partition_count(topics.regen.samples) is not None
        groups = sorted(t.removeprefix(f"{topics.ledger}.") for t in admin.topics() if t.startswith(f"{topics.ledger}."))
    if count is None:
        raise StreamError(f"run {run_id} has no topics on this broker (no {topics.samples})")
    if (groups or group is not None) and group not in groups:  # each group has its own ledger: one audit each
        raise OptionError("--group", f"is {group!r}; the run's trainer groups: {', '.join(groups) or 'none'}",
                          "name one of them (a run without train_groups: no --group)")  # fmt: skip
    prompts = _by_partition(transport, topics.prompts, count, timeout_s)
    samples = _by_partition(transport, topics.samples, count, timeout_s)
    again = _by_partition(transport, topics.regen.samples, count, timeout_s) if regenerated else None
    history = effective_history(read_ledger(transport, run_id, timeout_s=timeout_s, group=group))
    trained: Counter[tuple[int, str]] = Counter()
    for step in history:
        for rank in step.ranks:
            trained.update(zip(rank.sample_epochs(step.epoch), rank.sample_ids))
    epochs = sorted({epoch for epoch, _ in trained})
    audit = RunAudit(run_id, [], steps=len(history), epochs=epochs)
    committed: set[str] = set()
    valid = _verifier(store, {sample_id for _, sample_id in trained})
    for p in range(count):
        row = PartitionAudit(p)
        source = _own_sequence(prompts[p], run_id, Prompt, "source")
        row.foreign_prompts = source.foreign
        row.prompts = source.marker.count if source.marker is not None else len(source.own)
        row.source_ended = source.marker is not None
        gen = _own_sequence(samples[p], run_id, SampleRef, "generate", valid)
        row.refs, row.missing_refs = len(gen.own), gen.gaps
        row.duplicates, row.foreign_samples = gen.duplicates, gen.foreign
        row.generators_ended = gen.marker is not None
        row.dropped = gen.marker.dropped if gen.marker is not None else 0
        if again is not None:  # a storage budget's captures for later epochs: each stands for its prompt's sample
            regen = _own_sequence(again[p], topics.regen.run_id, SampleRef, "generate", valid)
            committed.update(ref.sample_id for ref in regen.own)
            row.missing_refs += regen.gaps
            row.duplicates, row.foreign_samples = row.duplicates + regen.duplicates, row.foreign_samples + regen.foreign
        for ref in gen.own:
            committed.add(ref.sample_id)
            for epoch in epochs or [ref.epoch]:  # once per epoch the run trained in
                again_id = sample_id_for(topics.regen.run_id, epoch, ref.prompt_id)
                times = trained[(epoch, ref.sample_id)] + trained[(epoch, again_id)]
                row.trained_once += times == 1
                row.trained_repeatedly += times > 1
                row.never_trained += times == 0
        audit.partitions.append(row)
    audit.unknown_trained = sum(1 for (_, sample_id) in trained if sample_id not in committed)
    seen_letters: set[tuple[str, int, int]] = set()
    for record in read_to_end(transport, topics.dlq, [0], timeout_s=timeout_s):
        try:
            letter = decode(record.value or b"")
        except DecodeError:
            continue
        if isinstance(letter, DeadLetter) and letter.run_id == run_id:
            where = (letter.source_topic, letter.partition, letter.offset)
            if where in seen_letters:  # a trainer that resumed re-reads and re-letters a record
                continue
            seen_letters.add(where)
            key = (stage_of(letter.source_topic), letter.error)
            audit.dead_letters[key] += 1
            audit.examples.setdefault(f"{key[0]}/{key[1]}", letter.reason[:200])
    return audit


def render_audit(audit: RunAudit) -> str:
    """A plain-text report: one row per partition, totals, dead letters, the verdict."""
    cols = [("prompts", "prompts"), ("refs", "refs"), ("dropped", "dropped"), ("trained", "trained_once"),
            ("repeated", "trained_repeatedly"), ("untrained", "never_trained"), ("lost", "lost"),
            ("dups", "duplicates"), ("foreign", "foreign_samples")]  # fmt: skip
    header = f"{'partition':>9} " + " ".join(f"{title:>9}" for title, _ in cols) + "  ended"
    lines = [
        f"audit of run {audit.run_id}: {audit.steps} optimizer steps, epochs {audit.epochs or '-'}",
        header,
    ]
    for p in audit.partitions:
        values = " ".join(f"{int(getattr(p, name)):>9}" for _, name in cols)
        ended = "yes" if p.generators_ended else ("source only" if p.source_ended else "no")
        lines.append(f"{p.partition:>9} {values}  {ended}")
    lines.append(f"{'total':>9} " + " ".join(f"{audit.total(name):>9}" for _, name in cols))
    foreign_prompts = audit.total("foreign_prompts")
    if foreign_prompts:
        lines.append(f"foreign records in the prompts topic: {foreign_prompts}")
    if audit.unknown_trained:
        lines.append(f"trained samples that no committed ref names: {audit.unknown_trained}")
    for (stage, error), n in sorted(audit.dead_letters.items()):
        lines.append(f"dead letters [{stage}] {error}: {n} (e.g. {audit.examples[f'{stage}/{error}']})")
    verdict = (
        "clean: nothing lost, nothing repeated"
        if audit.ok
        else (f"FAILED: {audit.lost} lost, {audit.repeated} repeated")
    )
    lines.append(verdict)
    return "\n".join(lines)
