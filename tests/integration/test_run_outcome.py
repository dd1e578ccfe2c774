"""A run that reached its end but trained too small a share of its prompts is a failure (issue 9.3).

The run's prompts come from the source's own publisher, but a quarter of them were tokenized
for another model: token ids the 512-token tiny target does not have. The generator refuses
those before any forward and dead-letters them (within the dead-letter policy's limits, so no
stage stops); the trainer trains the rest and reaches the end of the stream. 18 of 24 is below
``train.min_trained_fraction`` (0.99 by default): ``specstream train`` exits 1 with one
``error:`` line naming the key, the counts and what to do, and no draft is exported; the final
checkpoint is kept, and ``specstream export`` still writes a draft from it on request.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.app.config_file import load_config
from pipeline.app.manifest import claim_run
from pipeline.app.runtime import build_online_run
from pipeline.source.publisher import PromptPublisher
from pipeline.source.stage import VOCAB_MAPPING_URI
from pipeline.vocab import build_vocab_mapping
from tests.integration.test_runtime import write_config
from tests.support import make_prompts, one_error, spawn, wait_exit

pytestmark = pytest.mark.integration

PROMPTS = 24


def test_a_run_below_the_trained_fraction_fails_and_exports_nothing(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, data={"partitions": 2})
    cfg = load_config(path)
    online = build_online_run(cfg)
    claim_run(online.transport, cfg)
    prompts = make_prompts(run_id, PROMPTS, vocab=512)
    good = [p for i, p in enumerate(prompts) if i % 4 != 3]
    counts = torch.bincount(torch.tensor([t for p in good for t in p.input_ids]), minlength=512)
    online.store.put_bytes(VOCAB_MAPPING_URI, build_vocab_mapping(counts, 512, 128).to_bytes())
    foreign_model = [p.model_copy(update={"input_ids": [*p.input_ids[:-1], 700]}) if i % 4 == 3 else p
                     for i, p in enumerate(prompts)]  # fmt: skip
    PromptPublisher(online.transport, run_id, 2).publish(foreign_model)

    generator = spawn(["generate", "--config", str(path), "--worker-id", "g1"])
    try:
        code, out = wait_exit(spawn(["train", "--config", str(path)]), timeout_s=300)
        assert code == 1, out
        line = one_error(out)
        assert line.startswith(
            "error: StreamError: the run trained 18 of its 24 prompts (75.0%, the 0 tail samples included), "
            "below train.min_trained_fraction 0.99: 18 of 24 prompts trained, 0 missing"
        ), line
        assert "6 dead letters (0 input lines, 6 prompts, 0 foreign records)" in line and "nothing was exported" in line
        code, generated = wait_exit(generator, timeout_s=120)
        assert code == 0 and "18 samples, 6 to the DLQ" in generated, generated
    finally:
        if generator.poll() is None:
            generator.kill()
    assert not (tmp_path / "out" / "export").exists()
    assert list((tmp_path / "out" / "checkpoints").glob("step-*-end")), "the final checkpoint is kept"

    code, out = wait_exit(spawn(["export", "--config", str(path)]), timeout_s=180)  # what the line offers
    assert code == 0 and (tmp_path / "out" / "export" / "config.json").is_file(), out
