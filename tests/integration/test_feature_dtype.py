"""A run with compact features (``storage.dtype: fp8_e4m3``) on the real broker trains to the end:
every ref declares fp8 hidden states with their scales, the trainer decodes them, audit is clean,
and a replay from the stored fp8 features reproduces every ledger loss bit for bit."""

from __future__ import annotations

import pytest

from pipeline.app.audit import audit_run
from pipeline.app.config_file import load_config
from pipeline.app.replay import replay_run
from pipeline.app.runtime import build_online_run
from pipeline.core.feature_encoding import scale_name
from pipeline.core.features import AUX_HIDDEN, FINAL_HIDDEN
from pipeline.core.messages import SampleRef
from pipeline.core.topics import RunTopics
from pipeline.storage import FeatureStore
from tests.integration.test_runtime import write_config
from tests.support import read_messages

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_fp8_run_trains_to_the_end(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    path = write_config(
        tmp_path,
        kafka,
        run_id,
        tiny_target_dir,
        conversations=32,
        storage={"dtype": "fp8_e4m3"},
        train={"deterministic": True},
    )
    config = load_config(path)
    result = build_online_run(config).run()
    assert result.reason == "end_of_stream" and result.steps == 16
    assert result.summary.startswith("32 of 32 prompts trained, 0 missing, 0 duplicates dropped"), (
        result.summary
    )

    def all_refs(out: list) -> bool:
        return sum(isinstance(m, SampleRef) for _, m in out) >= 32

    refs = [m for _, m in read_messages(kafka, RunTopics(run_id).samples, range(4), until=all_refs)
            if isinstance(m, SampleRef)]  # fmt: skip
    for ref in refs:
        assert ref.tensors[AUX_HIDDEN].dtype == ref.tensors[FINAL_HIDDEN].dtype == "F8_E4M3"
        assert ref.tensors[scale_name(AUX_HIDDEN)].shape == [ref.num_tokens]
        assert ref.target.dtype == "float32", "the ref keeps the capture's dtype, which the reader decodes to"
    store = FeatureStore(config.storage.root, run_id)
    audit = audit_run(kafka, run_id, store=store)
    assert audit.ok and audit.total("trained_once") == 32, audit.to_json()
    assert (
        replay_run(config, str(tmp_path / "replay")).line()
        == "16 of 16 replayed steps bit-identical to the ledger"
    )
