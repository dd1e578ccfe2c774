"""Dead letters as the operator reads them: stage, grouping by cause, filters (no broker)."""

from __future__ import annotations

from pipeline.app.deadletters import Letter, count_by_reason, dead_letters_json, normalise_reason, select, stage_of
from pipeline.core.messages import DeadLetter


def _letter(source_topic: str, error: str, reason: str, offset: int = 0, payload: str = "x") -> Letter:
    return Letter.of(
        offset,
        DeadLetter(run_id="r", source_topic=source_topic, partition=0, offset=offset, error=error, reason=reason,
                   payload=payload, created_at=1.0),
    )  # fmt: skip


def test_stage_follows_from_what_the_record_was_read_from() -> None:
    assert stage_of("source:chats.jsonl") == "source"
    assert stage_of("r.prompts") == "generate"
    assert stage_of("r.samples") == "train"


def test_record_specific_numbers_paths_and_ids_do_not_split_a_cause() -> None:
    assert normalise_reason("line 7: not JSON (col 12)") == normalise_reason("line 120: not JSON (col 3)")
    assert normalise_reason("features/0/a.safetensors is missing") == normalise_reason("x/y/b.safetensors is missing")
    assert normalise_reason("sample 3fa9c0d2e1 checksum crc32c:0a1b2c3d") == normalise_reason(
        "sample 99aa00bb11 checksum crc32c:ffee0011"
    )
    assert normalise_reason("unknown schema 'a/1'") == normalise_reason("unknown schema 'b/2'")
    assert normalise_reason("line 7: not JSON") != normalise_reason("line 7: is missing")
    assert normalise_reason("not a UTF-8 JSON document") == "not a UTF-8 JSON document"  # a name keeps its digits
    assert normalise_reason("input_ids [-1, 5] uses crc32c") == "input_ids [N, N] uses crc32c"


def test_count_by_reason_groups_same_cause_largest_first_and_keeps_an_example() -> None:
    letters = [
        _letter("source:c.jsonl", "ConversationError.json", "line 3: not a JSON object", 3),
        _letter("source:c.jsonl", "ConversationError.json", "line 9: not a JSON object", 9),
        _letter("r.samples", "DecodeError", "not a UTF-8 JSON document", 1),
        _letter("r.samples", "DecodeError", "not a UTF-8 JSON document", 2),
        _letter("r.samples", "DecodeError", "not a UTF-8 JSON document", 3),
        _letter("r.prompts", "DecodeError", "not a UTF-8 JSON document", 1),  # another stage: its own group
    ]
    groups = count_by_reason(letters)
    assert [(g.stage, g.error, g.count) for g in groups] == [
        ("train", "DecodeError", 3), ("source", "ConversationError.json", 2), ("generate", "DecodeError", 1),
    ]  # fmt: skip
    assert groups[1].reason == "line N: not a JSON object" and groups[1].example == "line 3: not a JSON object"
    assert sum(g.count for g in groups) == len(letters)


def test_filters_limit_and_json_shape() -> None:
    letters = [
        _letter("r.samples", "DecodeError", "unknown schema 'x'", 1, payload="a\nb  " + "z" * 200),
        _letter("r.samples", "ForeignRecord", "seq 0 was already used", 2),
        _letter("source:c.jsonl", "ConversationError.json", "line 1: not JSON", 1),
    ]
    assert [x.offset for x in select(letters, stage="train")] == [1, 2]
    assert [x.error for x in select(letters, reason="SCHEMA")] == ["DecodeError"]
    assert [x.error for x in select(letters, reason="foreign")] == ["ForeignRecord"]  # the error type matches too
    out = dead_letters_json(letters, limit=1)
    assert out["count"] == 3 and len(out["letters"]) == 1 and sum(g["count"] for g in out["by_reason"]) == 3
    excerpt = out["letters"][0]["excerpt"]
    assert excerpt.startswith("a b zz") and "\n" not in excerpt and len(excerpt) == 80
