"""The single-process runtime and the CLI on a real broker: endings, signals, bad configs, processes.

Every process is started through the one entry point, ``specstream`` (``torchrun --no-python
specstream train`` for several trainer ranks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.app.config_file import load_config
from pipeline.app.runtime import build_online_run
from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaSettings
from tests.support import event_scalars, one_error, spawn, specstream_command, tree_state, wait_exit

pytestmark = pytest.mark.integration


def write_config(
    tmp_path: Path, kafka: KafkaSettings, run_id: str, target: Path, *, conversations: int = 48, **sections: Any
) -> Path:
    from pipeline.devkit.chats import markov_conversations, write_jsonl
    from pipeline.devkit.target import TINY_AUX_LAYER_IDS

    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_jsonl(markov_conversations(conversations, seed=1), str(data))
    raw: dict[str, Any] = {
        "run_id": run_id,
        "broker": {"bootstrap_servers": kafka.bootstrap_servers, "transaction_timeout_ms": 15000,
                   "session_timeout_ms": 6000},
        "storage": {"root": str(tmp_path / "features"), "retention": "retain"},
        "data": {"path": str(data), "max_length": 128, "partitions": 4},
        "target": {"backend": "hf", "model": str(target), "aux_layer_ids": list(TINY_AUX_LAYER_IDS), "batch_size": 4},
        "generate": {"high_watermark": 24, "low_watermark": 16},
        "train": {"device": "cpu", "batch_size": 2, "lr": 3e-3, "ttt_steps": 2, "draft_vocab_size": 128,
                  "save_interval": 4, "prefetch": 2, "output_dir": str(tmp_path / "out")},
    }  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def no_open_transactions(kafka: KafkaSettings, topics: RunTopics) -> bool:
    with kafka.admin() as admin:
        for topic in (topics.prompts, topics.samples):
            if admin.end_offsets(topic, range(4)) != admin.end_offsets(topic, range(4), committed_only=False):
                return False
    return True


def test_producer_first_the_trainer_drains_to_end_of_stream(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    from pipeline.train.export import load_exported

    config = load_config(write_config(tmp_path, kafka, run_id, tiny_target_dir))
    result = build_online_run(config).run()
    assert result.reason == "end_of_stream"
    assert result.summary.startswith("48 of 48 prompts trained, 0 missing, 0 duplicates dropped")
    assert result.export_dir and load_exported(result.export_dir, tiny_target_dir) is not None
    assert Path(result.plot_path or "").is_file()
    assert no_open_transactions(kafka, RunTopics(run_id))

    from pipeline.app.status import render_status, run_status

    status = run_status(kafka, run_id)
    assert status.step == result.steps and status.produced == status.consumed == 48 and status.dead_letters == 0
    assert all(p.generator_ended and p.backlog == 0 for p in status.partitions)
    assert "48 of 48 produced samples trained" in render_status(status)


def test_trainer_first_winds_the_generators_down(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    config = load_config(
        write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=160, train={"max_steps": 3})
    )
    started = time.monotonic()
    result = build_online_run(config).run()
    assert result.reason == "max_steps" and result.steps == 3
    assert time.monotonic() - started < 120
    produced = sum(s.refs for s in result.generators)
    assert produced < 160, "backpressure should have held the generators well short of the whole input"
    assert no_open_transactions(kafka, RunTopics(run_id))


class ExplodingTarget:
    """Delegates to the real backend, then fails on the eighth batch, like a GPU running out of
    memory; it fails only once the trainer has taken a step (``stepped``), so there is always
    something to checkpoint on the way out, whatever the threads' timing."""

    def __init__(self, inner: Any, stepped: Path) -> None:
        self.inner, self.info, self.calls, self.stepped = inner, inner.info, 0, stepped

    def capture(self, prompts: Any) -> Any:
        self.calls += 1
        if self.calls == 8:
            deadline = time.monotonic() + 120
            while not (self.stepped.exists() and self.stepped.read_text().strip()):
                assert time.monotonic() < deadline, "the trainer took no step from seven batches"
                time.sleep(0.1)  # polling the trainer's metrics file, bounded by the deadline
            raise RuntimeError("capture exploded: CUDA out of memory")
        return self.inner.capture(prompts)

    def close(self) -> None:
        self.inner.close()


def test_producer_error_stops_the_trainer_and_is_reraised_here(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    config = load_config(write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=120))
    online = build_online_run(config)
    real = online.make_backend
    stepped = tmp_path / "out" / "metrics.jsonl"
    online.make_backend = lambda: ExplodingTarget(real(), stepped)  # type: ignore[method-assign]
    finished = threading.Event()

    def run() -> None:
        try:
            online.run()
        except RuntimeError as exc:
            run.error = exc  # type: ignore[attr-defined]
        finally:
            finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert finished.wait(180), "the run hung after a producer failure"
    error = run.error  # type: ignore[attr-defined]
    assert "capture exploded" in str(error)
    assert "capture" in "".join(traceback.format_tb(error.__traceback__))
    assert list((tmp_path / "out" / "checkpoints").glob("step-*")), "the trainer should checkpoint on the way out"


def test_sigterm_checkpoints_and_exits_zero(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=400)
    proc = spawn(["run", "--config", str(path)])
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no training step within 120 s"
        time.sleep(0.2)  # polling another process's output file, bounded by the deadline
    proc.send_signal(signal.SIGTERM)
    code, out = wait_exit(proc, timeout_s=120)
    assert code == 0, out
    assert list((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert no_open_transactions(kafka, RunTopics(run_id))


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda c: c["train"].update(lrate=1), "train.lrate"),
        (lambda c: c["target"].update(model="/nonexistent/model"), "target.model"),
        (lambda c: c["broker"].update(bootstrap_servers="127.0.0.1:1", client_options={"bootstrap_timeout_ms": 3000}),
         "127.0.0.1:1"),
        (lambda c: c["storage"].update(root="/proc/specstream/features"), "storage.root"),
        (lambda c: c["broker"].update(client_options={"sasl.passwrd": "x"}), "broker.client_options.sasl.passwrd"),
        (lambda c: c["storage"].update(options={"secret": "${SPECSTREAM_TEST_UNSET}"}), "SPECSTREAM_TEST_UNSET"),
        (lambda c: c["train"].update(world_size=2), "train.world_size"),
        (lambda c: c["train"].update(device="cdua"), "train.device"),
    ],
    ids=["typo", "missing-model", "unreachable-broker", "unwritable-storage", "client-option", "unset-variable",
         "world-size", "device"],
)
def test_bad_config_stops_at_start_with_one_message_and_writes_nothing(
    kafka, run_id, tmp_path, tiny_target_dir, mutate, key
) -> None:
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir)
    raw = yaml.safe_load(path.read_text())
    mutate(raw)
    path.write_text(yaml.safe_dump(raw))
    code, out = wait_exit(spawn(["run", "--config", str(path)]), timeout_s=120)
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], out
    assert "Traceback" not in out
    with kafka.admin() as admin:
        assert not {t for t in admin.topics() if t.startswith(run_id)}
    assert not (tmp_path / "features").exists() and not (tmp_path / "out").exists()


def test_stages_as_separate_processes_with_a_two_rank_trainer(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    from pipeline.train.export import load_exported

    path = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=64,
        train={"world_size": 2}, generate={"high_watermark": 48, "low_watermark": 32},
    )  # fmt: skip
    code, out = wait_exit(spawn(["source", "--config", str(path)]), timeout_s=120)
    assert code == 0 and "64 prompts published" in out, out
    changed = tmp_path / "changed.yaml"
    changed.write_text(path.read_text().replace("lr: 0.003", "lr: 0.001"))
    code, out = wait_exit(spawn(["generate", "--config", str(changed), "--worker-id", "stray"]), timeout_s=120)
    assert code == 2 and "train.lr: 0.003 in the run, 0.001 here" in out, out  # another config is refused, by key
    # What does not change the trained result may differ per node: capture batch size, queue depth.
    other_node = tmp_path / "other-node.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["target"]["batch_size"], raw["generate"]["queue_depth"] = 2, 1
    other_node.write_text(yaml.safe_dump(raw))
    generators = [spawn(["generate", "--config", str(p), "--worker-id", f"gen-{i}"]) for i, p in enumerate([path, other_node])]
    code = -1
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", specstream_command(), "train", "--config", str(path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        code, out = wait_exit(trainer, timeout_s=240)
    finally:
        for proc in generators:
            if proc.poll() is None and code != 0:
                proc.kill()
    assert code == 0, out
    assert out.count("64 of 64 prompts trained, 0 missing") == 1, out  # the summary, on rank 0 only
    assert out.count("optimizer steps (end_of_stream)") == 1, out
    for proc in generators:
        gcode, gout = wait_exit(proc, timeout_s=120)
        assert gcode == 0, gout
    code, out = wait_exit(spawn(["export", "--config", str(path)]), timeout_s=120)
    assert code == 0, out
    assert load_exported(out.strip().splitlines()[-1], tiny_target_dir) is not None


def test_replay_reproduces_the_ledger_bit_for_bit(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    from pipeline.app.replay import replay_run

    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=40, train={"deterministic": True})
    config = load_config(path)
    live = build_online_run(config).run()
    assert live.reason == "end_of_stream" and live.steps == 20
    live_events = sorted((Path(config.train.output_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(live_events) == 1
    report = replay_run(config, str(tmp_path / "replay"))
    assert report.line() == "20 of 20 replayed steps bit-identical to the ledger"
    assert sorted((Path(config.train.output_dir) / "tensorboard").glob("*")) == live_events, (
        "the replay must not write into the live run's event files"
    )
    assert [s for s, _ in event_scalars(tmp_path / "replay" / "tensorboard")["train/loss"]] == list(range(1, 21))
    from pipeline.ledger import read_ledger

    assert len(read_ledger(kafka, run_id)) == 20, "the replay must not write to the run's ledger"

    # A second replay into the same directory is refused at start and leaves the first one as it was.
    before = tree_state(tmp_path / "replay")
    code, out = wait_exit(spawn(["replay", "--config", str(path), "--out", str(tmp_path / "replay")]), timeout_s=120)
    assert code == 2, out
    line = one_error(out)
    assert f"`--out`: {tmp_path / 'replay'} already holds" in line and "pass --out <another directory>" in line
    assert tree_state(tmp_path / "replay") == before
