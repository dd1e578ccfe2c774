"""The planner admits only the source's own numbered prompts and refuses bad ones before any forward."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.core.errors import CaptureContractError
from pipeline.core.messages import EndOfStream, Prompt, decode, encode
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import Record
from pipeline.generate.planner import BatchPlanner, decode_prompts
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.writer import Publish, Sample

RUN = "run"


class CountingTarget:
    """The synthetic target, remembering every prompt it ran (to prove what was never run)."""

    def __init__(self, broken: bool = False) -> None:
        self.inner = SyntheticTarget(hidden_size=8, vocab_size=64)
        self.info = self.inner.info
        self.ran: list[list[int]] = []
        self.broken = broken

    def capture(self, prompts: Any) -> Any:
        self.ran.extend(list(ids) for ids, _ in prompts)
        if self.broken:
            raise CaptureContractError("aux layer 9 does not exist")
        return self.inner.capture(prompts)

    def close(self) -> None:
        pass


def prompt(seq: int | None, ids: list[int] | None = None) -> Prompt:
    ids = ids or [1, 2, 3, 4]
    return Prompt(run_id=RUN, prompt_id=f"p{seq}", input_ids=ids, loss_mask=[0] + [1] * (len(ids) - 1), seq=seq)


def records(*values: bytes, partition: int = 0) -> list[Record]:
    return [Record(f"{RUN}.prompts", partition, i, None, v) for i, v in enumerate(values)]


def plan(target: CountingTarget, values: list[bytes], counters: PartitionCounters | None = None, **kw: Any):
    planner = BatchPlanner(target, run_id=RUN, epoch=0, **kw)
    state = {0: counters or PartitionCounters()}
    batch = planner.plan(decode_prompts(records(*values), RUN), state, epoch=0, group=None)
    return batch, state[0]


def letters(batch) -> list[str]:
    return [decode(i.value).reason for i in batch.items if isinstance(i, Publish) and i.topic.endswith(".dlq")]


def test_only_numbered_prompts_in_order_are_the_sources() -> None:
    target = CountingTarget()
    batch, c = plan(target, [encode(prompt(0)), encode(prompt(None)), b"junk", encode(prompt(0)), encode(prompt(1))])
    samples = [i for i in batch.items if isinstance(i, Sample)]
    assert [(s.prompt.prompt_id, s.seq) for s in samples] == [("p0", 0), ("p1", 1)]
    assert (c.refs, c.dropped, c.foreign, c.missing) == (2, 0, 3, 0)
    reasons = letters(batch)
    assert any("without a sequence number" in r for r in reasons) and any("already taken" in r for r in reasons)


def test_out_of_vocabulary_and_overlong_prompts_are_refused_before_any_forward() -> None:
    target = CountingTarget()
    values = [encode(prompt(0, [1, 99, 2])), encode(prompt(1, list(range(1, 20)))), encode(prompt(2))]
    batch, c = plan(target, values, max_prompt_tokens=16)
    assert target.ran == [[1, 2, 3, 4]]  # only the good prompt ever reached the target
    assert (c.refs, c.dropped) == (1, 2)
    reasons = letters(batch)
    assert any("token id 99 is outside the target's vocabulary of 64" in r for r in reasons)
    assert any("19 tokens, above data.max_length 16" in r for r in reasons)


def test_a_gap_in_the_sources_numbers_fails_the_partition_at_its_marker() -> None:
    marker = EndOfStream(run_id=RUN, stage="source", partition=0, count=3, seq=3)
    batch, c = plan(CountingTarget(), [encode(prompt(0)), encode(prompt(2)), encode(marker)])
    assert (c.refs, c.missing, c.ended) == (2, 1, True)
    forwarded = [decode(i.value) for i in batch.items if isinstance(i, Publish) and i.topic.endswith(".samples")]
    assert len(forwarded) == 1 and forwarded[0].status == "failed" and "never arrived" in forwarded[0].reason
    assert (forwarded[0].count, forwarded[0].seq) == (2, 2)


def test_a_target_that_breaks_the_contract_on_its_first_prompts_stops_at_start() -> None:
    with pytest.raises(CaptureContractError, match="first prompts.*aux layer 9"):
        plan(CountingTarget(broken=True), [encode(prompt(0))])


def test_a_single_refused_prompt_is_a_dead_letter_not_a_crash() -> None:
    target = CountingTarget()
    planner = BatchPlanner(target, run_id=RUN, epoch=0)
    state = {0: PartitionCounters()}
    planner.plan(decode_prompts(records(encode(prompt(0))), RUN), state, epoch=0, group=None)  # one good batch
    target.broken = True
    batch = planner.plan(decode_prompts(records(encode(prompt(1))), RUN), state, epoch=0, group=None)
    assert (state[0].refs, state[0].dropped) == (1, 1) and "aux layer 9" in letters(batch)[0]
