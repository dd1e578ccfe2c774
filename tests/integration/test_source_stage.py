"""The source stage on a real broker: conversations -> prompts, DLQ or fail, vocab, restarts.

Input is the tiny target's Markov conversations (ShareGPT and OpenAI shapes) plus malformed
lines, at an fsspec URL; the tokenizer and chat template are the tiny target's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import fsspec
import pytest
import torch

from pipeline.core.errors import ConversationError, RunMismatchError
from pipeline.core.messages import DeadLetter, EndOfStream, Prompt, encode, prompt_id_for
from pipeline.core.progress import SourceCounters, read_source_counters
from pipeline.core.topics import RunTopics
from pipeline.devkit.chats import markov_conversations
from pipeline.devkit.target import build_tiny_target
from pipeline.source.publisher import PromptPublisher
from pipeline.source.stage import SourceConfig, SourceStage, read_vocab_mapping
from pipeline.storage import FeatureStore
from pipeline.transport.kafka import KafkaSettings, PlainProducer
from pipeline.vocab import build_vocab_mapping, count_tokens
from tests.support import make_prompts, read_messages

pytestmark = pytest.mark.integration

BAD_JSON = '{"conversations": [{"from": "human", "value": "reve"'
NO_ASSISTANT = json.dumps({"conversations": [{"from": "human", "value": "reve pale"}]})


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return build_tiny_target()  # cached after the first build on this machine


def write_data(url: str, n: int, *, seed: int, bad_at: dict[int, str] | None = None) -> None:
    """``n`` conversations, every third one in the OpenAI shape, bad lines inserted at indexes."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    lines = []
    for i, record in enumerate(markov_conversations(n, seed=seed)):
        if i % 3 == 2:
            record = {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]}
        lines.append(json.dumps(record))
    for index, text in sorted((bad_at or {}).items()):
        lines.insert(index, text)
    with fsspec.open(url, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def read_topic(kafka: KafkaSettings, topics: RunTopics) -> dict[int, list]:
    records = read_messages(
        kafka, topics.prompts, range(4),
        until=lambda m: sum(isinstance(x, EndOfStream) for _, x in m) == 4, timeout_s=30,
    )  # fmt: skip
    by_partition: dict[int, list] = defaultdict(list)
    for p, message in records:
        by_partition[p].append(message)
    return by_partition


def test_conversations_become_round_robin_prompts_with_eos_counts_dlq_and_vocab(
    kafka, run_topics, storage_root, tiny_dir
) -> None:
    run_id = run_topics.run_id
    url = f"memory://{run_id}/conversations.jsonl"  # any fsspec URL
    write_data(url, 40, seed=3, bad_at={5: BAD_JSON, 17: NO_ASSISTANT})
    config = SourceConfig(
        run_id=run_id, data=url, tokenizer=str(tiny_dir), partitions=4, storage_root=storage_root,
        max_length=96, draft_vocab_size=64, chunk_size=8,
    )  # fmt: skip
    result = SourceStage(kafka, config).run()
    assert (result.prompts, result.malformed, result.stats.published) == (40, 2, 40)
    assert result.truncated > 0  # max_length 96 cuts the longer conversations

    by_partition = read_topic(kafka, run_topics)
    prompts: list[Prompt] = []
    for p in range(4):
        *body, marker = by_partition[p]
        assert isinstance(marker, EndOfStream) and marker.status == "complete" and marker.count == len(body) == 10
        prompts.extend(body)
    order = sorted(prompts, key=lambda m: int(m.source["line"]))
    for i, prompt in enumerate(order):  # prompt i of the source on partition i % 4
        assert prompt in by_partition[i % 4]
        line = int(prompt.source["line"])
        assert prompt.prompt_id == prompt_id_for(line - 1, prompt.input_ids)  # stable: from the line
        assert len(prompt.input_ids) <= 96 and prompt.input_ids[0] == 0  # <|begin_of_text|>
        assert 0 < sum(prompt.loss_mask) < len(prompt.loss_mask)  # assistant tokens only
        assert prompt.loss_mask[:5] == [0] * 5  # the first header is never supervised

    letters = read_messages(kafka, run_topics.dlq, [0], until=lambda m: len(m) >= 2)
    reasons = [l.reason for _, l in sorted(letters, key=lambda m: m[1].offset) if isinstance(l, DeadLetter)]
    assert [r.split(": ")[0] for r in reasons] == [f"{url}:6", f"{url}:18"]  # file and line number
    assert "json" in reasons[0] and "no_assistant" in reasons[1]

    stored = read_vocab_mapping(FeatureStore(storage_root, run_id))
    expected = build_vocab_mapping(count_tokens((p.input_ids, p.loss_mask) for p in prompts), 512, 64)
    assert torch.equal(stored.d2t, expected.d2t) and torch.equal(stored.t2d, expected.t2d)
    assert result.vocab_fingerprint == expected.fingerprint()
    assert Path(storage_root, run_id, "vocab_mapping.safetensors").is_file()


class Interrupted(RuntimeError):
    pass


class CrashingSource(SourceStage):
    """Dies (without closing anything politely above the publisher) after ``after`` items."""

    def __init__(self, *args, after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after = after

    def _items(self, *args, **kwargs):
        for n, item in enumerate(super()._items(*args, **kwargs)):
            if n == self.after:
                raise Interrupted("machine lost")
            yield item


class PromptsUnread:
    """The broker, except that opening a reader on the prompts topic fails the test: whatever
    goes through it never scans the topic it publishes."""

    def __init__(self, inner: KafkaSettings, topics: RunTopics) -> None:
        self.inner = inner
        self.topics = topics

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def reader(self, topic: str, **options):
        assert topic != self.topics.prompts, f"read {topic}: a restart must cost O(partitions), not O(prompts)"
        return self.inner.reader(topic, **options)


def test_a_restarted_source_publishes_every_prompt_and_letter_once(kafka, run_topics, storage_root, tiny_dir, tmp_path) -> None:
    run_id = run_topics.run_id
    url = str(tmp_path / "data.jsonl")
    write_data(url, 30, seed=5, bad_at={2: BAD_JSON, 9: BAD_JSON, 25: NO_ASSISTANT})
    config = SourceConfig(
        run_id=run_id, data=url, tokenizer=str(tiny_dir), partitions=4, storage_root=storage_root,
        draft_vocab_size=32, chunk_size=5,
    )  # fmt: skip
    with pytest.raises(Interrupted):
        CrashingSource(kafka, config, after=20).run()
    assert read_vocab_mapping(FeatureStore(storage_root, run_id)) is None  # only stored at the end

    assert sum(c.letters for c in read_source_counters(kafka, run_topics, 4).values()) == 2  # lines 3 and 10

    result = SourceStage(PromptsUnread(kafka, run_topics), config).run()  # the restart never reads the topic
    assert result.stats.skipped > 0 and result.stats.published + result.stats.skipped == 30

    by_partition = read_topic(kafka, run_topics)
    ids = [m.prompt_id for p in range(4) for m in by_partition[p] if isinstance(m, Prompt)]
    assert len(ids) == len(set(ids)) == 30
    assert [by_partition[p][-1].count for p in range(4)] == [8, 8, 7, 7]
    letters = read_messages(kafka, run_topics.dlq, [0], until=lambda m: len(m) >= 3, timeout_s=10)
    assert sorted(letter.offset for _, letter in letters) == [3, 10, 26]  # each bad line once
    counters = read_source_counters(kafka, run_topics, 4)
    assert [(c.prompts, c.ended) for c in counters.values()] == [(8, True), (8, True), (7, True), (7, True)]
    assert sum(c.letters for c in counters.values()) == 3  # the run's summary reports these

    write_data(url, 30, seed=6)  # other conversations under the same run: the vocabulary check still holds
    with pytest.raises(RunMismatchError, match="conversations changed"):
        SourceStage(PromptsUnread(kafka, run_topics), config).run()


def test_a_restart_reads_the_source_counts_not_the_prompts_topic(kafka, run_topics) -> None:
    """Restart cost is O(partitions): a restart after 600 committed prompts reads one offsets
    request, never the topic (PromptsUnread), and publishes only the rest, each once; records
    another producer put into the topic meanwhile change nothing."""
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, 800)

    def until_crash(limit: int):
        for n, prompt in enumerate(prompts):
            if n == limit:
                raise Interrupted("machine lost")
            yield prompt

    with pytest.raises(Interrupted):
        PromptPublisher(kafka, run_id, 4, chunk_size=50).publish(until_crash(620))  # 600 committed, 20 aborted
    assert read_source_counters(kafka, run_topics, 4) == {p: SourceCounters(150, 0, False) for p in range(4)}
    strays = PlainProducer(kafka)
    strays.send(run_topics.prompts, b"\x00 not json", partition=0)
    strays.send(run_topics.prompts, encode(prompts[0].model_copy(update={"seq": 150})), partition=1)
    strays.flush()
    strays.close()

    again = PromptPublisher(PromptsUnread(kafka, run_topics), run_id, 4, chunk_size=50).publish(iter(prompts))
    assert (again.skipped, again.published) == (600, 200)
    assert read_source_counters(kafka, run_topics, 4) == {p: SourceCounters(200, 0, True) for p in range(4)}
    records = read_messages(
        kafka, run_topics.prompts, range(4), skip_undecodable=True, timeout_s=60,
        until=lambda m: sum(isinstance(x, EndOfStream) for _, x in m) == 4,
    )  # fmt: skip
    for p in range(4):
        stray = prompts[0].prompt_id if p == 1 else None  # the forged one (prompt 0 belongs to partition 0)
        own = [m for q, m in records if q == p and isinstance(m, Prompt) and m.prompt_id != stray]
        assert [m.seq for m in own] == list(range(200)), p  # each number once, in order
        assert [m.prompt_id for m in own] == [x.prompt_id for x in prompts[p::4]]



def test_fail_policy_stops_the_run_with_file_and_line_on_every_partition(kafka, run_topics, storage_root, tiny_dir, tmp_path) -> None:
    run_id = run_topics.run_id
    url = str(tmp_path / "data.jsonl")
    write_data(url, 20, seed=7, bad_at={12: BAD_JSON})
    config = SourceConfig(
        run_id=run_id, data=url, tokenizer=str(tiny_dir), partitions=4, storage_root=storage_root,
        on_malformed="fail", draft_vocab_size=32, chunk_size=4,
    )  # fmt: skip
    with pytest.raises(ConversationError, match=rf"{url}:13: json"):
        SourceStage(kafka, config).run()
    by_partition = read_topic(kafka, run_topics)
    for p in range(4):
        marker = by_partition[p][-1]
        assert isinstance(marker, EndOfStream) and marker.status == "failed"
        assert f"{url}:13" in marker.reason
        assert marker.count == sum(isinstance(m, Prompt) for m in by_partition[p])  # committed chunks
    assert read_vocab_mapping(FeatureStore(storage_root, run_id)) is None
