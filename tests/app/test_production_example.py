"""``examples/production-8b.yaml`` is honest: it loads with the real loader (the password from the
environment), and the sizes its comments state follow from the feature layout and its settings."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

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

    samples = t.max_steps * cfg.global_batch if t.max_steps else 0
    assert samples == 1_600_000
    kept = t.keep_last * t.save_interval * cfg.global_batch
    assert kept in stated and f"{kept * sample / 1e12:.2f} TB" in text
    assert f"{samples * sample / 1e12:.0f} TB" in text  # what `retain` would keep

    per_partition = samples / cfg.data.partitions
    ref_bytes = len(encode(ref))
    assert ref_bytes < 1000 and per_partition * ref_bytes < topics.samples_retention_bytes
    longest_ids = [128000 + i % 256 for i in range(length)]  # 6-digit token ids: the longest JSON
    prompt = Prompt(run_id=cfg.run_id, prompt_id="chats-000001234567", input_ids=longest_ids,
                    loss_mask=[i % 2 for i in range(length)], source={"line": "1234567"}, seq=1234567)  # fmt: skip
    prompt_bytes = len(encode(prompt))
    assert f"<= {prompt_bytes / 1000:.1f} KB" in text and per_partition * prompt_bytes < topics.prompts_retention_bytes
    assert f"{per_partition * prompt_bytes / 1e9:.2f} GB per partition" in text
    assert f"{samples * prompt_bytes / 1e9 * 3:.0f} GB" in text  # prompts retained on 3 replicas
    assert topics.replication_factor == 3 and topics.min_insync_replicas == 2
