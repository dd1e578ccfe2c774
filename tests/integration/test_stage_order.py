"""The stages of a run may start in any order (issue 9, item 12): a trainer and a generator
started before the source say once what they wait for and go on when it arrives; nothing
arriving within the bound is one `error:` line naming what is missing and what to start."""

from __future__ import annotations

import pytest

from tests.integration.test_runtime import write_config
from tests.support import one_error, spawn, wait_exit, wait_for_output

pytestmark = pytest.mark.integration


def test_train_and_generate_started_before_the_source_wait_for_it(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=32)
    trainer = spawn(["train", "--config", str(path)])
    generator = spawn(["generate", "--config", str(path), "--worker-id", "gen-early"])
    procs = [trainer, generator]
    try:
        waiting = wait_for_output(trainer, r"waiting up to 3600 s for the source", timeout_s=120)
        assert "its topics and manifest and its vocabulary mapping" in waiting[-1], waiting
        early = wait_for_output(generator, r"waiting up to 600 s for the source", timeout_s=120)
        assert "its topics and manifest" in early[-1], early
        code, out = wait_exit(spawn(["source", "--config", str(path)]), timeout_s=120)
        assert code == 0 and "32 prompts published" in out, out
        code, out = wait_exit(trainer, timeout_s=300)
        assert code == 0, out
        assert "32 of 32 prompts trained, 0 missing" in out, out
        assert "constant learning rate" not in out, out  # the prompt total was known: a cosine schedule
        assert "waiting up to" not in out  # said once (read above), not repeated
        code, out = wait_exit(generator, timeout_s=120)
        assert code == 0 and "32 samples" in out, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.parametrize(
    ("stage", "key", "missing"),
    [
        (["train"], "train.wait_for_source_s", "its topics and manifest and its vocabulary mapping"),
        (["generate", "--worker-id", "gen-lonely"], "generate.wait_for_source_s", "its topics and manifest"),
    ],
)
def test_a_stage_whose_source_never_starts_stops_with_one_error(
    kafka, run_id, tmp_path, tiny_target_dir, stage, key, missing
) -> None:
    section, name = key.split(".")
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, **{section: {name: 2}})
    code, out = wait_exit(spawn([stage[0], "--config", str(path), *stage[1:]]), timeout_s=120)
    assert code == 2, out
    line = one_error(out)
    assert f"run {run_id} still lacks {missing} after waiting 2 s" in line, line
    assert "start `specstream source`" in line and key in line, line
