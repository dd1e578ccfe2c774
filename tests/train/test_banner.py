"""The start banner says what is about to happen, from the values it is given."""

from __future__ import annotations

from dataclasses import replace

from pipeline.train.banner import BannerFacts, banner_text

FACTS = BannerFacts(
    run_id="quickstart-1a2b3c4d",
    target="/cache/tiny-llama",
    target_hidden=64,
    target_layers=4,
    target_vocab=512,
    aux_layer_ids=[0, 1, 3],
    draft_hidden=64,
    draft_vocab=128,
    ttt_steps=3,
    conversations=768,
    prompts=768,
    partitions=4,
    world_size=2,
    per_rank_batch=8,
    total_steps=48,
    steps_from="max_steps",
    resume=None,
    storage_root="/data/features",
)


def _rows(text: str) -> dict[str, str]:
    return dict(tuple(part.strip() for part in line.split(" = ", 1)) for line in text.splitlines()[1:])


def test_the_banner_shows_shapes_data_batches_steps_and_storage() -> None:
    text = banner_text(FACTS)
    assert text.splitlines()[0] == "***** Running training *****"
    rows = _rows(text)
    assert rows["Run"] == "quickstart-1a2b3c4d"
    assert rows["Target"] == "/cache/tiny-llama: hidden 64, 4 layers, vocab 512, aux layers [0, 1, 3]"
    assert rows["Draft"] == "hidden 64, vocab 512 -> draft vocab 128, TTT depth 3"
    assert (rows["Conversations"], rows["Prompts"], rows["Partitions"], rows["World size"]) == ("768", "768", "4", "2")
    assert rows["Batch per rank"] == "8 samples per optimizer step"
    assert rows["Global batch"] == "16 samples per optimizer step"
    assert rows["Total optimizer steps"] == "48 (max_steps)"
    assert rows["Resume"] == "none (a fresh start)"
    assert rows["Storage root"] == "/data/features"


def test_unknowns_and_a_stream_without_an_end_are_said_so() -> None:
    text = banner_text(replace(FACTS, total_steps=None, prompts=None, target_layers=None,
                               resume="checkpoint step 10 (offsets p0:12, p1:9)"))  # fmt: skip
    rows = _rows(text)
    assert rows["Total optimizer steps"] == "to end of stream"
    assert rows["Prompts"] == "unknown (the source has not finished)"
    assert "unknown layers" in rows["Target"]
    assert rows["Resume"] == "checkpoint step 10 (offsets p0:12, p1:9)"
