"""Conversation JSONL -> prompts: assistant-only loss masks for any template, formats, bad lines.

The expected token ids and masks are written out by hand from each template's shape (an oracle
independent of the code under test), for the tiny Llama-3-style tokenizer and for a ChatML
(Qwen2.5-shaped) one with a default system prompt and a newline after every end-of-turn token.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError, ConversationError, DecodeError
from pipeline.core.messages import Prompt, decode, encode, prompt_id_for
from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.devkit.target import build_tiny_tokenizer
from pipeline.source.conversations import (
    MalformedLine,
    TokenizedConversation,
    normalize_messages,
    read_conversations,
)
from pipeline.source.template import tokenize_conversation

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


@pytest.fixture(scope="module")
def llama3():
    return build_tiny_tokenizer("llama3")


@pytest.fixture(scope="module")
def chatml():
    return build_tiny_tokenizer("chatml")


def _expected_llama3(tok, messages) -> tuple[list[str], list[int]]:
    tokens, mask = ["<|begin_of_text|>"], [0]
    for m in messages:
        body = m["content"].split()
        supervised = int(m["role"] == "assistant")
        tokens += ["<|start_header_id|>", m["role"], "<|end_header_id|>", "\n\n", *body, "<|eot_id|>"]
        mask += [0, 0, 0, 0] + [supervised] * (len(body) + 1)
    return tokens, mask


def _expected_chatml(tok, messages) -> tuple[list[str], list[int]]:
    tokens: list[str] = []
    if messages[0]["role"] != "system":
        tokens += [
            "<|im_start|>",
            "system",
            "\n",
            "You",
            "are",
            "a",
            "helpful",
            "assistant",
            ".",
            "<|im_end|>",
            "\n",
        ]
    mask = [0] * len(tokens)
    for m in messages:
        body = m["content"].split()
        supervised = int(m["role"] == "assistant")
        tokens += ["<|im_start|>", m["role"], "\n", *body, "<|im_end|>", "\n"]
        mask += [0, 0, 0] + [supervised] * (len(body) + 2)
    return tokens, mask


def _records(n: int = 20, seed: int = 3) -> list[dict]:
    return markov_conversations(n, seed=seed, turns=(1, 3), words_per_turn=(1, 9), system_prob=0.5)


def _openai(record: dict) -> dict:
    return {"messages": [{"role": ROLE[t["from"]], "content": t["value"]} for t in record["conversations"]]}


@pytest.mark.parametrize(("style", "oracle"), [("llama3", _expected_llama3), ("chatml", _expected_chatml)])
def test_loss_mask_is_exactly_the_assistant_replies_and_their_end_of_turn(
    style: str, oracle: Callable, request
) -> None:
    tok = request.getfixturevalue(style)
    records = _records()
    assert any(r["conversations"][0]["from"] == "system" for r in records)
    assert any(len(r["conversations"]) >= 5 for r in records)
    for record in records:
        messages = normalize_messages(record)
        ids, mask, truncated = tokenize_conversation(tok, messages)
        tokens, expected_mask = oracle(tok, messages)
        assert tok.convert_ids_to_tokens(ids) == tokens
        assert mask == expected_mask
        assert not truncated
        # the template's own tokenization agrees: special tokens are not added twice
        assert tok.apply_chat_template(messages, tokenize=True, return_dict=False) == ids


def test_sharegpt_and_openai_records_give_identical_prompts(llama3, tmp_path: Path) -> None:
    records = _records(12)
    openai = [_openai(r) for r in records]
    # content as a list of text parts is the same text
    first = openai[0]["messages"][-1]
    first["content"] = [
        {"type": "text", "text": first["content"][:3]},
        {"type": "text", "text": first["content"][3:]},
    ]
    write_jsonl(records, tmp_path / "sharegpt.jsonl")
    write_jsonl(openai, tmp_path / "openai.jsonl")
    a = list(read_conversations(tmp_path / "sharegpt.jsonl", llama3))
    b = list(read_conversations(tmp_path / "openai.jsonl", llama3))
    assert len(a) == len(b) == 12
    for x, y in zip(a, b, strict=True):
        assert (x.prompt_id, x.input_ids, x.loss_mask) == (y.prompt_id, y.input_ids, y.loss_mask)


def test_truncation_keeps_a_prefix_and_drops_conversations_left_without_supervision(llama3) -> None:
    record = {
        "conversations": [
            {"from": "human", "value": "reve pale nize ruzu dili"},
            {"from": "gpt", "value": "pose nize reve"},
        ]
    }
    full_ids, full_mask, _ = tokenize_conversation(llama3, normalize_messages(record))
    assert len(full_ids) == 19 and full_mask.index(1) == 15
    ids, mask, truncated = tokenize_conversation(llama3, normalize_messages(record), max_length=17)
    assert truncated and ids == full_ids[:17] and mask == full_mask[:17] and sum(mask) == 2
    write_jsonl([record], "memory://trunc/a.jsonl")
    (item,) = read_conversations("memory://trunc/a.jsonl", llama3, max_length=17)
    assert isinstance(item, TokenizedConversation) and item.truncated and item.source()["truncated"] == "1"
    (bad,) = read_conversations("memory://trunc/a.jsonl", llama3, max_length=15, policy="dlq")
    assert isinstance(bad, MalformedLine) and bad.kind == "no_supervised_tokens" and bad.line == 1
    with pytest.raises(ConversationError, match="memory://trunc/a.jsonl:1: no_supervised_tokens"):
        list(read_conversations("memory://trunc/a.jsonl", llama3, max_length=15))


def test_last_assistant_turn_only(chatml) -> None:
    messages = [
        {"role": "user", "content": "reve"},
        {"role": "assistant", "content": "pale nize"},
        {"role": "user", "content": "ruzu"},
        {"role": "assistant", "content": "dili"},
    ]
    ids, mask, _ = tokenize_conversation(chatml, messages, assistant_turns="last")
    tokens = chatml.convert_ids_to_tokens(ids)
    assert [t for t, m in zip(tokens, mask) if m] == ["dili", "<|im_end|>", "\n"]
    _, all_mask, _ = tokenize_conversation(chatml, messages)
    assert sum(all_mask) == 4 + 3


def test_a_leading_assistant_turn_is_dropped(llama3) -> None:
    write_jsonl(
        [
            {
                "conversations": [
                    {"from": "gpt", "value": "nize"},
                    {"from": "human", "value": "reve"},
                    {"from": "gpt", "value": "pale"},
                ]
            }
        ],
        "memory://lead/a.jsonl",
    )
    (item,) = read_conversations("memory://lead/a.jsonl", llama3)
    assert item.dropped_leading_assistant
    assert "nize" not in llama3.convert_ids_to_tokens(item.input_ids)
    assert [t for t, m in zip(llama3.convert_ids_to_tokens(item.input_ids), item.loss_mask) if m] == [
        "pale",
        "<|eot_id|>",
    ]


BAD_LINES = [
    (b'{"conversations": [{"from": "human", "value": "reve"}, {"from": "gpt", "value": "pale"}]}', None),
    (b'{"conversations": [{"from": "human", "value": "reve"}', "json"),
    (b'{"id": 7, "text": "no conversation here"}', "schema"),
    (b'{"conversations": [{"from": "human"}, {"from": "gpt", "value": "pale"}]}', "schema"),
    (b'{"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "pale"}]}', "role"),
    (b'{"conversations": []}', "empty"),
    (b'{"messages": [{"role": "user", "content": "reve"}]}', "no_assistant"),
    (b"[1, 2, 3]", "schema"),
    (b"", None),  # blank line: skipped, still counted
    (b'{"conversations": [{"from": "human", "value": "\xff\xfe"}]}', "encoding"),
    (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "schema"),
    (
        b'{"id": "last", "messages": [{"role": "user", "content": "reve"}, {"role": "assistant", "content": "pale"}]}',
        None,
    ),
]


def _write_bad_file(path: Path) -> None:
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")


def test_malformed_lines_are_reported_with_file_and_line_under_dlq(llama3, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    items = list(read_conversations(path, llama3, policy="dlq", start_index=100))
    expected = [(n, kind) for n, (line, kind) in enumerate(BAD_LINES, start=1) if line]
    assert [(i.line, getattr(i, "kind", None)) for i in items] == expected
    for item in items:
        assert item.url == str(path)
        if isinstance(item, MalformedLine):
            assert isinstance(item.error, ConversationError) and isinstance(item.error, DecodeError)
            assert str(item).startswith(f"{path}:{item.line}: {item.kind}: ")
            assert item.raw and not item.raw_truncated
    good = [i for i in items if isinstance(i, TokenizedConversation)]
    assert [g.index for g in good] == [100, 111]  # start_index + line - 1: stable ids
    assert good[0].prompt_id == prompt_id_for(100, good[0].input_ids)
    assert good[1].record_id == "last" and good[1].source() == {"url": str(path), "line": "12", "id": "last"}
    by_line = {i.line: i for i in items}
    assert "robot" in by_line[5].reason and "`conversations` is empty" in by_line[6].reason
    assert "has no `value`" in by_line[4].reason and "not valid JSON" in by_line[2].reason


def test_the_first_malformed_line_raises_under_fail(llama3, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    seen: list = []
    with pytest.raises(ConversationError) as info:
        for item in read_conversations(path, llama3, policy="fail"):
            seen.append(item)
    assert len(seen) == 1 and isinstance(seen[0], TokenizedConversation)
    assert (info.value.url, info.value.line, info.value.kind) == (str(path), 2, "json")
    assert str(info.value).startswith(f"{path}:2: json: not valid JSON")


def test_any_fsspec_url_and_compression(llama3, tmp_path: Path) -> None:
    records = _records(4)
    write_jsonl(records, tmp_path / "a.jsonl")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write((tmp_path / "a.jsonl").read_text())
    write_jsonl(records, "memory://urls/a.jsonl")
    results = [
        [(i.prompt_id, i.loss_mask) for i in read_conversations(url, llama3)]
        for url in (
            tmp_path / "a.jsonl",
            str(tmp_path / "a.jsonl"),
            f"file://{tmp_path}/a.jsonl",
            "memory://urls/a.jsonl",
            tmp_path / "a.jsonl.gz",
        )
    ]
    assert len(results[0]) == 4 and all(r == results[0] for r in results)


def test_prompts_are_valid_messages(llama3) -> None:
    write_jsonl(_records(3), "memory://msg/a.jsonl")
    for item in read_conversations("memory://msg/a.jsonl", llama3):
        prompt = item.to_prompt("run-1")
        assert decode(encode(prompt)) == prompt and isinstance(prompt, Prompt)
        assert prompt.source["line"] == str(item.line)


def _with_template(tok, template: str):
    copy = build_tiny_tokenizer("chatml")
    copy.chat_template = template
    return copy


# Qwen3-shaped: only the final assistant turn carries its "thinking" text, so rendering a prefix
# changes how an earlier turn looks.
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}You are {% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_prefix_unstable_template_is_reported_not_guessed(chatml) -> None:
    tok = _with_template(chatml, REWRITING)
    messages = [
        {"role": "user", "content": "reve"},
        {"role": "assistant", "content": "pale"},
        {"role": "user", "content": "nize"},
        {"role": "assistant", "content": "dili"},
    ]
    with pytest.raises(ConversationError, match="prefix-unstable"):
        tokenize_conversation(tok, messages)
    ids, mask, _ = tokenize_conversation(tok, messages, assistant_turns="last")
    assert [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m] == [
        "You",
        "are",
        "dili",
        "<|im_end|>",
        "\n",
    ]


def test_a_template_that_raises_is_a_record_error(chatml) -> None:
    tok = _with_template(
        chatml,
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system must come first') }}{% endif %}{{ m['content'] }}{% endfor %}",
    )
    write_jsonl(
        [
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ],
        "memory://raise/a.jsonl",
    )
    (item,) = read_conversations("memory://raise/a.jsonl", tok, policy="dlq")
    assert item.kind == "template" and "system must come first" in item.reason


def test_configuration_errors(llama3) -> None:
    no_template = build_tiny_tokenizer("llama3")
    no_template.chat_template = None
    with pytest.raises(ConfigError, match="no chat_template"):
        list(read_conversations("memory://cfg/none.jsonl", no_template))
    with pytest.raises(ConfigError, match="unknown policy"):
        list(read_conversations("memory://cfg/none.jsonl", llama3, policy="skip"))  # type: ignore[arg-type]


def test_non_text_content_parts_are_refused() -> None:
    with pytest.raises(ConversationError, match="non-text content part"):
        normalize_messages(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}
        )
    assert json.loads(json.dumps(normalize_messages({"messages": [{"role": "USER", "content": "x"}]}))) == [
        {"role": "user", "content": "x"}
    ]


def test_a_line_above_the_byte_limit_is_refused_without_being_held(tmp_path) -> None:
    """Issue 9.16: a huge line becomes a dead letter naming its size; the lines after it still count."""
    from pipeline.devkit.target import build_tiny_tokenizer
    from pipeline.source.conversations import MalformedLine, read_conversations

    good = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    huge = json.dumps({"conversations": [{"from": "human", "value": "x" * 50_000}]})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([good, huge, good]) + "\n")
    items = list(read_conversations(path, build_tiny_tokenizer(), policy="dlq", max_line_bytes=10_000))
    assert [type(i).__name__ for i in items] == ["TokenizedConversation", "MalformedLine", "TokenizedConversation"]
    bad = items[1]
    assert isinstance(bad, MalformedLine) and bad.kind == "too_long" and bad.line == 2
    assert f"{len(huge) + 1} bytes" in bad.reason and len(bad.raw) <= 4096
