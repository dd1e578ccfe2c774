"""``examples/production-8b.yaml`` is honest: it loads with the real loader (the password from the
environment), and the sizes its comments state follow from the feature layout and its settings."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pipeline.app.config_budget import HEADER_BYTES, feature_budget
from pipeline.app.config_file import load_config
from pipeline.core.features import AUX_HIDDEN, FINAL_HIDDEN, INPUT_IDS, LOSS_MASK
from pipeline.core.messages import Prompt, SampleRef, TargetInfo, TensorSpec, encode

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "production-8b.yaml"
HIDDEN, LAYERS = 4096, 32  # Llama-3.1-8B
BYTES = {"I64": 8, "U8": 1, "BF16": 2}


def _numbers(text: str) -> set[int]:
    return {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\d|\d", text)}


def _ref(length: int) -> SampleRef:
    """A sample ref as a generator of this run writes it (long ids, an s3:// URI)."""
    specs = {INPUT_IDS: TensorSpec(dtype="I64", shape=[length]), LOSS_MASK: TensorSpec(dtype="U8", shape=[length]),
             AUX_HIDDEN: TensorSpec(dtype="BF16", shape=[length, 3 * HIDDEN]),
             FINAL_HIDDEN: TensorSpec(dtype="BF16", shape=[length, HIDDEN])}  # fmt: skip
    nbytes = sum(math.prod(s.shape) * BYTES[s.dtype] for s in specs.values())
    target = TargetInfo(model_id="/models/Meta-Llama-3.1-8B-Instruct", revision="0" * 40, num_layers=LAYERS,
                        aux_layer_ids=[1, 15, 28], hidden_size=HIDDEN, vocab_size=128256, dtype="bfloat16")  # fmt: skip
    return SampleRef(run_id="llama31-8b-eagle3-v1", sample_id="llama31-8b-eagle3-v1.p17.000001234567-e0",
                     prompt_id="chats-000001234567", producer_id="gen-node07-gpu3", nbytes=nbytes,
                     uri="s3://my-bucket/specstream/llama31-8b-eagle3-v1/p17/000001234567-e0.safetensors",
                     checksum="crc32c:0123abcd", num_tokens=length, tensors=specs, target=target,
                     created_at=1.7e9, seq=1234567)  # fmt: skip


def test_the_production_example_sizes_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "from-the-secret-store")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("SPECSTREAM_STORAGE", raising=False)
    cfg = load_config(EXAMPLE)
    text = EXAMPLE.read_text()
    stated = _numbers(text)
    assert "${KAFKA_PASSWORD}" in text and cfg.broker.client_options["sasl_plain_password"] == "from-the-secret-store"
    assert cfg.train.output_dir.startswith("s3://") and cfg.storage.root.startswith("s3://")

    length = cfg.data.max_length
    ref = _ref(length)
    sample = ref.nbytes  # the four tensors at max_length
    assert sample == 67_127_296 and sample in stated and sample // length in stated  # 32,777 B per token

    g, t, topics = cfg.generate, cfg.train, cfg.topics
    window = cfg.global_batch + t.world_size * t.prefetch * t.batch_size
    assert window == 80 and g.high_watermark >= window
    assert g.high_watermark_bytes is not None and g.low_watermark_bytes == g.high_watermark_bytes * 3 // 4
    at_max = g.high_watermark_bytes // sample
    assert at_max == 1023 and at_max >= window and f"{at_max / window:.1f}x" in text
    assert g.high_watermark_bytes // g.high_watermark == 32 << 20  # the count cap bites below 32 MiB per sample

    samples = t.max_steps * cfg.global_batch if t.max_steps else 0  # sample passes
    assert samples == 1_600_000 and t.epochs == 10
    prompts = samples // t.epochs
    assert prompts in stated
    kept = t.keep_last * t.save_interval * cfg.global_batch
    assert kept in stated and f"{kept * sample / 1e12:.2f} TB" in text
    assert f"{prompts * sample / 1e12:.1f} TB" in text  # what `retain` would keep

    budget = feature_budget(cfg, (HIDDEN, 2))  # what storage.max_bytes reserves and keeps, as the trainer divides it
    assert budget is not None and budget.sample_bytes == sample + HEADER_BYTES and budget.sample_bytes in stated
    assert budget.transient_samples in stated and f"{budget.reserve / 1e12:.2f} TB" in text
    assert f"{budget.keep_share * cfg.data.partitions / 1e12:.2f} TB" in text and f"{budget.keep_share / 1e9:.1f} GB" in text
    average = _ref(800).nbytes + HEADER_BYTES
    kept_avg = budget.keep_share * cfg.data.partitions // average
    assert abs(kept_avg - 144_200) < 100 and f"({round(100 * kept_avg / prompts)} %)" in text
    passes = prompts + (prompts - kept_avg) * (t.epochs - 1)
    assert abs(passes - 302_000) < 1000 and f"({passes / samples:.2f}x)" in text

    per_partition = samples / cfg.data.partitions  # refs, online and captured again: at most one per pass
    ref_bytes = len(encode(ref))
    assert ref_bytes < 1000 and per_partition * ref_bytes < topics.samples_retention_bytes
    longest_ids = [128000 + i % 256 for i in range(length)]  # 6-digit token ids: the longest JSON
    prompt = Prompt(run_id=cfg.run_id, prompt_id="chats-000001234567", input_ids=longest_ids,
                    loss_mask=[i % 2 for i in range(length)], source={"line": "1234567"}, seq=1234567)  # fmt: skip
    prompt_bytes = len(encode(prompt))
    prompts_per_partition = prompts / cfg.data.partitions
    assert f"<= {prompt_bytes / 1000:.1f} KB" in text
    assert prompts_per_partition * prompt_bytes < topics.prompts_retention_bytes
    assert f"{prompts_per_partition * prompt_bytes / 1e9:.2f} GB per partition" in text
    assert f"{prompts * prompt_bytes / 1e9 * 3:.1f} GB" in text  # prompts retained on 3 replicas
    assert topics.replication_factor == 3 and topics.min_insync_replicas == 2
