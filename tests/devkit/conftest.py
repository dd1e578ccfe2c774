"""Fixtures for the tiny-target tests (devkit and generate): one torch thread, seeded.

``build_tiny_target`` caches under ``$SPECSTREAM_HOME`` (default ``~/.cache/specstream``), so only
the first session on a machine pays for the training (~15-35 s on 2 cores); later sessions reuse it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, seeded: two OpenMP threads on a shared 2-core box run far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
