"""The single-process runtime on the in-process transport: the whole job without a Kafka broker."""

from __future__ import annotations

from pathlib import Path

from pipeline.app.config_file import parse_config
from pipeline.app.runtime import build_online_run
from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.devkit.target import TINY_AUX_LAYER_IDS


def test_online_run_on_the_memory_transport(tmp_path: Path, tiny_target_dir: Path) -> None:
    data = tmp_path / "data.jsonl"
    write_jsonl(markov_conversations(32, seed=2), str(data))
    config = parse_config(
        {
            "run_id": "memory-run",
            "broker": {"bootstrap_servers": "memory"},
            "storage": {"root": str(tmp_path / "features"), "retention": "delete"},
            "data": {"path": str(data), "max_length": 128, "partitions": 2},
            "target": {"backend": "hf", "model": str(tiny_target_dir), "aux_layer_ids": list(TINY_AUX_LAYER_IDS)},
            "generate": {"high_watermark": 16, "low_watermark": 8},
            "train": {"batch_size": 2, "ttt_steps": 2, "draft_vocab_size": 64, "prefetch": 2,
                      "output_dir": str(tmp_path / "out")},
        }  # fmt: skip
    )
    said: list[str] = []
    result = build_online_run(config).run(announce=said.append)
    assert result.reason == "end_of_stream" and result.steps == 16
    # DESIGN 4.4: (keep_last * save_interval * global batch + peak backlog) * bytes per sample, said at start;
    # the peak backlog: the high watermark + one trainer window (2 + 2 x 2 over 2 partitions)
    assert any(line.startswith("projected peak feature storage: (2 x 100 x 2 + 22) samples x") for line in said)
    assert not list((tmp_path / "features" / "memory-run" / "features").rglob("*.safetensors")), (
        "retention=delete should leave no feature a retained checkpoint cannot need"
    )
    assert result.summary.startswith("32 of 32 prompts trained, 0 missing, 0 duplicates dropped, 0 tail")
