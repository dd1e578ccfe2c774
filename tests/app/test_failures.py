"""An error the project did not raise is said as its cause and what to do (issue 9.15).

The storage faults themselves run for real in ``tests/faults/test_storage_faults.py``; here, the
shapes those errors reach the CLI in: kafka-python's own exceptions (escaped, or translated to
``TransportError``), an OSError in a wrapper's chain (torch's checkpoint writer), and one a
library reports only as text (safetensors).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError
from safetensors.torch import save_file

from pipeline.app.failures import explain
from pipeline.core.topics import FencedError, TransportError
from tests.support import tmpfs


@pytest.mark.parametrize(
    "error", [NodeNotReadyError(1), KafkaConnectionError("refused"), KafkaTimeoutError()]
)
def test_kafka_python_errors_name_the_broker_and_the_rerun(error: Exception) -> None:
    try:
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("the writer thread failed") from inner  # re-raised through a wrapper
    except RuntimeError as outer:
        line = explain(outer)
    assert line is not None and line.startswith(f"the Kafka broker failed ({type(error).__name__}")
    assert "`specstream broker status`" in line and line.endswith(
        "run the same command again: it resumes exactly"
    )


def test_a_translated_transport_error_is_the_broker_but_a_fenced_one_is_not() -> None:
    line = explain(TransportError("NodeNotReadyError: node 1 not ready", retriable=True))
    assert line is not None and line.startswith(
        "the Kafka broker failed (NodeNotReadyError: node 1 not ready)"
    )
    assert explain(FencedError("another generator took over")) is None


def test_a_read_only_filesystem_inside_a_library_error_is_found_with_its_path(tmp_path: Path) -> None:
    error = RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")
    error.__context__ = OSError(errno.EROFS, "Read-only file system")
    error.add_note(f"writing checkpoint {tmp_path}/step-000000004")
    line = explain(error)
    assert line == (
        f"read-only file system writing checkpoint {tmp_path}/step-000000004: remount it read-write, or set "
        "storage.root / train.output_dir to another filesystem, then run the same command again: it resumes exactly"
    )


def test_safetensors_reports_the_os_error_as_text_on_a_real_read_only_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "256k") as remount:
        remount("ro")
        with pytest.raises(Exception) as info:
            save_file({"x": torch.zeros(2)}, str(tmp_path / "ro" / "x.safetensors"))
    assert "os error 30" in str(info.value)  # not an OSError: only its text says what happened
    line = explain(info.value)
    assert line is not None and line.startswith(f"read-only file system writing {tmp_path}/ro/"), line
    assert explain(ValueError("a library's own bug")) is None
