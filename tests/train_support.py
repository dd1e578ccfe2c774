"""Helpers for the trainer tests and the data-wait benchmark.

- ``MemorySource``: an in-memory stand-in for ``SampleStream`` (same state/resume contract), so
  the trainer loop can be tested without a broker.
- ``write_tiny_target`` / ``write_vocab``: a Hugging Face-layout target directory (embedding +
  lm_head) and a frozen vocab map (``write_run_vocab``: where ``specstream train`` looks for it).
- ``publish_samples``: prompts -> generator workers (synthetic target) -> samples topic, all
  committed before it returns (a producer infinitely faster than the trainer).
- ``train_cmd``: writes a run config and returns ``specstream train``'s arguments for it;
  ``spawn_train`` starts them (under torchrun for several ranks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from pipeline.core.eos import Completeness, PartitionState
from pipeline.core.messages import (
    EndOfStream,
    Prompt,
    SampleRef,
    TargetInfo,
    TensorSpec,
    encode,
    now,
    prompt_id_for,
    sample_id_for,
)
from pipeline.core.progress import StreamItem, StreamState
from pipeline.core.topics import RunTopics
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.ledger import LedgerTail
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.train.config import TrainerSettings
from pipeline.transport.kafka import KafkaSettings, PlainProducer
from pipeline.vocab import build_vocab_mapping
from tests.support import specstream_command

HIDDEN, VOCAB, DRAFT_VOCAB = 64, 512, 128
TARGET_INFO = TargetInfo(
    model_id="synthetic",
    revision="seed-0",
    num_layers=4,
    aux_layer_ids=[0, 1, 2],
    hidden_size=HIDDEN,
    vocab_size=VOCAB,
    dtype="float32",
)


# --- model files ---------------------------------------------------------------------------


def write_tiny_target(directory: Path, *, seed: int = 0) -> Path:
    """Llama-style 4-layer target with H=64, V=512: only config, embedding and lm_head."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 4,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
            "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 4,
        },
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return directory


def write_run_vocab(storage: str, run_id: str) -> Path:
    """The frozen vocab map where the source stage would have stored it for ``run_id``."""
    path = Path(storage) / run_id / "vocab_mapping.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_vocab(path)


def write_vocab(path: Path, *, seed: int = 1) -> Path:
    counts = torch.zeros(VOCAB, dtype=torch.long)
    chosen = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:200]
    counts[chosen] = torch.arange(200, 0, -1)
    build_vocab_mapping(counts, VOCAB, DRAFT_VOCAB).save(str(path))
    return path


# --- the loop without a run config ---------------------------------------------------------


def loop_settings(**values: Any) -> TrainerSettings:
    """Complete trainer settings for tests of the loop alone: small, constant rate, retention
    delete; ``values`` override any (``checkpoint_dir`` is required)."""
    base: dict[str, Any] = {
        "run_id": "run", "batch_size": 2, "grad_accum": 1, "lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.0,
        "warmup_ratio": 0.0, "schedule": "constant", "schedule_steps": None, "max_steps": None, "grad_clip": 0.5,
        "ttt_steps": 2, "loss_decay": 0.8, "max_length": 32, "seed": 0, "bf16": False, "deterministic": True,
        "save_interval": 3, "keep_last": 1, "retention": "delete", "resume": "auto", "prefetch": 4,
        "idle_timeout_s": 600.0, "drain_timeout_s": None, "collective_timeout_s": 600.0, "metrics_path": None,
        "plot_path": None, "min_trained_fraction": 1.0,
    }  # fmt: skip
    return TrainerSettings(**{**base, **values})


# --- in-memory source ----------------------------------------------------------------------


def sample_tensors(index: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + index)
    mask = torch.ones(length, dtype=torch.uint8)
    mask[:2] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (length,), generator=g),
        "loss_mask": mask,
        "aux_hidden_states": torch.randn(length, 3 * HIDDEN, generator=g),
        "final_hidden_states": torch.randn(length, HIDDEN, generator=g),
    }


def fake_ref(run_id: str, partition: int, index: int, length: int) -> SampleRef:
    sample_id = f"{run_id}.e000.p{index:09d}"
    return SampleRef(
        run_id=run_id,
        sample_id=sample_id,
        prompt_id=f"p{index:09d}",
        producer_id="mem",
        uri=FeatureStore.uri_for(partition, sample_id, "a0"),
        nbytes=1,
        checksum="crc32c:00000000",
        num_tokens=length,
        tensors={"input_ids": TensorSpec(dtype="I64", shape=[length])},
        target=TARGET_INFO,
        created_at=0.0,
        seq=index,
    )


class MemorySource:
    """``SampleStream``'s contract over a list: one partition, positions = next index."""

    def __init__(
        self,
        run_id: str,
        lengths: Sequence[int],
        *,
        state: StreamState | None = None,
        fail_at: int | None = None,
    ) -> None:
        self.run_id = run_id
        self.lengths = list(lengths)
        self.next = state.positions[0] if state else 0
        self.dead_letters = 0
        self.dropped_upstream = 0
        self.fail_at = fail_at
        self.closed = False

    def _ended(self) -> bool:
        return self.next >= len(self.lengths)

    def items(self) -> Iterator[StreamItem]:
        while not self._ended():
            i = self.next
            if self.fail_at is not None and i == self.fail_at:
                raise RuntimeError(f"source failed at {i}")
            self.next += 1
            yield StreamItem(
                fake_ref(self.run_id, 0, i, self.lengths[i]), sample_tensors(i, self.lengths[i]), 0, i
            )

    def state(self) -> StreamState:
        count = len(self.lengths)
        marker = EndOfStream(run_id=self.run_id, stage="generate", partition=0, count=count, seq=count)
        partition = PartitionState(0, next_seq=self.next, used=self.next, marker=marker if self._ended() else None)
        return StreamState(positions={0: self.next}, partitions={0: partition.to_json()}, cursor=0)

    def summary(self) -> Completeness:
        ended = self._ended()
        return Completeness(
            expected=len(self.lengths) if ended else self.next,
            used=self.next,
            missing=0,
            duplicates=0,
            foreign=0,
            partitions_ended=int(ended),
            partitions=1,
        )

    def close(self) -> None:
        self.closed = True


# --- live samples ---------------------------------------------------------------------------


def make_prompts(run_id: str, count: int, *, tokens: int = 24) -> list[Prompt]:
    """Prompts whose content does not depend on the run id (two runs see the same tensors)."""
    prompts = []
    for i in range(count):
        ids = [(i * 31 + j * 17 + 3) % VOCAB for j in range(tokens + i % 7)]
        mask = [0] * 3 + [1] * (len(ids) - 3)
        prompts.append(Prompt(run_id=run_id, prompt_id=prompt_id_for(i, ids), input_ids=ids, loss_mask=mask))
    return prompts


def publish_samples(
    settings: KafkaSettings,
    run_id: str,
    storage_root: str,
    partitions: int,
    count: int,
    *,
    tokens: int = 24,
    hidden: int = HIDDEN,
    workers: int = 2,
    timeout_s: float = 120.0,
) -> None:
    """Publish ``count`` prompts and generate their samples (synthetic target) to the end of stream."""
    PromptPublisher(settings, run_id, partitions).publish(make_prompts(run_id, count, tokens=tokens))
    store = FeatureStore(storage_root, run_id, durable=False)
    shares = [list(range(partitions))[i::workers] for i in range(workers)]
    errors: list[BaseException] = []

    def work(worker_id: str, owned: list[int]) -> None:
        try:
            GeneratorWorker(
                settings,
                store,
                SyntheticTarget(hidden_size=hidden, vocab_size=VOCAB),
                GeneratorConfig(run_id=run_id, worker_id=worker_id, partitions=owned, batch_size=16),
            ).run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"gen-{i}", s)) for i, s in enumerate(shares) if s]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
        if t.is_alive():
            raise TimeoutError("generator did not finish")
    if errors:
        raise errors[0]


def train_cmd(
    config_path: Path,
    *,
    kafka: KafkaSettings,
    run_id: str,
    storage: str,
    out: Path,
    target: Path,
    train: Mapping[str, Any],
    retention: str = "delete",
    partitions: int = 4,
) -> list[str]:
    """Write the run config of a trainer reading ``run_id``'s samples; return ``specstream``'s args.

    ``partitions`` is the config's (a multiple of the world size); the trainer takes the real
    count from the samples topic. ``data.path`` is never read: the samples are already there.
    """
    raw = {
        "run_id": run_id,
        "broker": {"bootstrap_servers": kafka.bootstrap_servers},
        "storage": {"root": storage, "retention": retention},
        "data": {"path": str(config_path.parent / "conversations.jsonl"), "partitions": partitions},
        "target": {"backend": "hf", "model": str(target), "aux_layer_ids": [0, 1, 2]},
        "train": {
            "device": "cpu", "draft_vocab_size": DRAFT_VOCAB, "output_dir": str(out), "idle_timeout_s": 60,
            "collective_timeout_s": 120, **train,
        },
    }  # fmt: skip
    config_path.write_text(yaml.safe_dump(raw))
    _claim_once(kafka, config_path)
    return ["train", "--config", str(config_path), "--verbose"]


def _claim_once(kafka: KafkaSettings, config_path: Path) -> None:
    """The run's manifest, as the source would have written it first (the trainer waits for it)."""
    from pipeline.app.config_file import load_config  # lazy: start-up, only the process tests
    from pipeline.app.manifest import read_manifest, write_manifest  # lazy: as above

    config = load_config(config_path)
    if read_manifest(kafka, RunTopics(config.run_id)) is None:  # the test made the topics (any partitions)
        write_manifest(kafka, config)


def spawn_train(
    args: Sequence[str], *, env: dict[str, str] | None = None, torchrun: int | None = None
) -> subprocess.Popen[str]:
    """``specstream ARGS`` (under torchrun with N ranks: ``--no-python specstream``) in its own process group."""
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("SPECSTREAM_CRASH_AT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [specstream_command(), *args]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)]
        cmd = [*launcher, "--no-python", *cmd]
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_for_step(
    settings: KafkaSettings, run_id: str, proc: subprocess.Popen[str], step: int, *, timeout_s: float = 120.0
) -> None:
    """Until the run's ledger holds ``step`` (bounded; a trainer that exits first fails the test)."""
    tail = LedgerTail(settings, run_id)
    try:
        deadline = time.monotonic() + timeout_s
        while (latest := tail.latest()) is None or latest.step < step:
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, f"the trainer did not reach step {step}"
            time.sleep(0.2)  # polling an observable condition, not timing a race
    finally:
        tail.close()


def wait_train(proc: subprocess.Popen[str], timeout_s: float = 180.0) -> tuple[int, str]:
    """(exit code, output); on timeout the whole process group (torchrun's ranks too) is killed."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"trainer did not exit within {timeout_s} s:\n{out[-6000:]}") from None
    return proc.returncode, out


def run_train(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
    torchrun: int | None = None,
) -> tuple[int, str]:
    return wait_train(spawn_train(args, env=env, torchrun=torchrun), timeout_s)


def publish_open_stream(
    settings: KafkaSettings, run_id: str, storage_root: str, partitions: int, count: int, *, tokens: int = 24
) -> list[SampleRef]:
    """Sample refs round-robin over the partitions and no end-of-stream marker: the stream stays open."""
    store = FeatureStore(storage_root, run_id, durable=False)
    target = SyntheticTarget(hidden_size=HIDDEN, vocab_size=VOCAB)
    producer = PlainProducer(settings)
    refs = []
    try:
        for i, prompt in enumerate(make_prompts(run_id, count, tokens=tokens)):
            p = i % partitions
            sample_id = sample_id_for(run_id, 0, prompt.prompt_id)
            stored = store.put(p, sample_id, target.capture([(prompt.input_ids, prompt.loss_mask)])[0])
            ref = SampleRef(
                run_id=run_id,
                sample_id=sample_id,
                prompt_id=prompt.prompt_id,
                producer_id="open",
                uri=stored.uri,
                nbytes=stored.nbytes,
                checksum=stored.checksum,
                num_tokens=len(prompt.input_ids),
                tensors=stored.tensors,
                target=target.info,
                created_at=now(),
                seq=i // partitions,  # numbered like a generator's own output
            )
            producer.send(RunTopics(run_id).samples, encode(ref), partition=p, key=sample_id.encode())
            refs.append(ref)
        producer.flush()
    finally:
        producer.close()
    return refs
