"""Source + two HF generator processes over 4 partitions, on the tiny trained target.

The source turns conversations into prompts; two ``specstream generate --backend hf``
processes share the prompt partitions as members of the generators' group. Every prompt must
yield exactly one visible ref, every file must match its ref (size, checksum, header) and hold
the hidden states the target really produces, and every samples partition must end with an
end-of-stream marker carrying its count.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.core.messages import EndOfStream, Prompt
from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.devkit.target import TINY_AUX_LAYER_IDS, build_tiny_target
from pipeline.generate.hf import HFTarget
from pipeline.source.stage import SourceConfig, SourceStage
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from tests.support import read_messages, spawn, wait_exit

pytestmark = pytest.mark.integration

CONVERSATIONS = 48


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return build_tiny_target()


def test_source_and_two_hf_generator_processes_exactly_once(kafka, run_topics, storage_root, tiny_dir, tmp_path) -> None:
    run_id = run_topics.run_id
    data = tmp_path / "conversations.jsonl"
    write_jsonl(markov_conversations(CONVERSATIONS, seed=11), data)
    source = SourceStage(
        kafka,
        SourceConfig(
            run_id=run_id, data=str(data), tokenizer=str(tiny_dir), partitions=4,
            storage_root=storage_root, max_length=128, draft_vocab_size=64,
        ),
    ).run()  # fmt: skip
    assert source.prompts == CONVERSATIONS

    args = [
        "generate", "--run-id", run_id, "--storage", storage_root, "--bootstrap", kafka.bootstrap_servers,
        "--backend", "hf", "--model", str(tiny_dir), "--aux-layer-ids", ",".join(map(str, TINY_AUX_LAYER_IDS)),
        "--batch-size", "4", "--session-timeout-ms", "6000", "--transaction-timeout-ms", "10000",
    ]  # fmt: skip
    procs = [spawn([*args, "--worker-id", f"gen-{name}"], env={"OMP_NUM_THREADS": "1"}) for name in "ab"]
    produced = []
    for proc in procs:
        code, out = wait_exit(proc, timeout_s=150)
        assert code == 0, out
        produced.append(int(re.search(r"(\d+) samples", out).group(1)))  # type: ignore[union-attr]
    assert sum(produced) == CONVERSATIONS, produced  # the two workers split the work without overlap

    prompts = {
        m.prompt_id: m
        for _, m in read_messages(
            kafka, run_topics.prompts, range(4), until=lambda m: sum(isinstance(x, EndOfStream) for _, x in m) == 4
        )
        if isinstance(m, Prompt)
    }
    store = FeatureStore(storage_root, run_id)
    stream = SampleStream(kafka, store, run_id, range(4), idle_timeout_s=60)
    try:
        items = list(stream)  # verifies every file's size, checksum and header against its ref
    finally:
        stream.close()
    summary = stream.summary()
    assert (summary.expected, summary.used, summary.missing, summary.duplicates) == (CONVERSATIONS, CONVERSATIONS, 0, 0)
    assert Counter(i.ref.prompt_id for i in items) == Counter(prompts.keys())  # exactly one ref per prompt
    markers = [m for _, m in read_messages(kafka, run_topics.samples, range(4), until=lambda m: sum(isinstance(x, EndOfStream) for _, x in m) == 4) if isinstance(m, EndOfStream)]
    per_partition = Counter(i.partition for i in items)
    assert {m.partition: m.count for m in markers} == dict(per_partition) == {p: 12 for p in range(4)}
    assert all(m.status == "complete" for m in markers)

    target = HFTarget(tiny_dir, aux_layer_ids=TINY_AUX_LAYER_IDS)
    try:
        for item in items[:: max(1, len(items) // 8)]:  # a spread of samples against a fresh capture
            prompt = prompts[item.ref.prompt_id]
            want = target.capture([(prompt.input_ids, prompt.loss_mask)])[0]
            assert torch.equal(item.tensors["input_ids"], want["input_ids"])
            assert torch.equal(item.tensors["loss_mask"], want["loss_mask"])
            for name in ("aux_hidden_states", "final_hidden_states"):
                torch.testing.assert_close(item.tensors[name], want[name], rtol=1e-4, atol=1e-5)
            assert item.ref.target == target.info
    finally:
        target.close()
