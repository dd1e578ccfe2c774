"""Conversation JSONL -> tokenized prompts with assistant-only loss masks, for any chat template.

The two record shapes and the reading live here; rendering and the masks live in
:mod:`pipeline.source.template`.

Input: one JSON object per line at any fsspec URL (local path, ``file://``, ``memory://``,
``s3://``...; ``.gz``/``.bz2``/``.xz``/``.zst`` are decompressed by extension), in either shape:

- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``
- OpenAI:   ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}``
  (``content`` may also be a list of ``{"type": "text", "text": ...}`` parts).

Each conversation is rendered with the target tokenizer's chat template and tokenized once,
without adding special tokens (the template already holds them). The loss mask is 1 exactly on
the assistant replies: the reply text and whatever the template closes the turn with (``<|eot_id|>``
for Llama 3, ``<|im_end|>\\n`` for ChatML); headers, system and user turns are 0. It is found
without knowing the template: for assistant message i, the reply's characters are those that
``render(messages[:i + 1])`` adds to ``render(messages[:i], add_generation_prompt=True)``;
the fast tokenizer's offset mapping then marks every token overlapping one of those spans. A
template for which these renders are not prefixes of the full render (e.g. one that rewrites
earlier turns) is reported per record instead of guessed at.

A leading assistant turn (before any user turn) is dropped, as SpecForge does: nothing prompts
it. Records are then truncated to ``max_length`` tokens. A bad line never stops the stream
unless the caller asks for it: under ``policy="dlq"`` it comes out as a :class:`MalformedLine`
(file, line number, kind, reason, raw text) and the iteration goes on; under ``"fail"``
:class:`ConversationError` is raised.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import fsspec

from pipeline.core.errors import ConfigError, ConversationError
from pipeline.core.messages import Prompt, prompt_id_for
from pipeline.source.template import AssistantTurns, check_tokenizer, tokenize_conversation

__all__ = ("Policy", "MalformedLine", "TokenizedConversation", "read_conversations", "normalize_messages")

Policy = Literal["dlq", "fail"]

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
_RAW_LIMIT = 4096
#: Longer lines are refused before they are parsed or tokenized (memory is bounded by config).
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class MalformedLine:
    """A line that was skipped, with everything a dead-letter record needs.

    ``kind``: ``encoding`` | ``json`` | ``schema`` | ``role`` | ``empty`` | ``no_assistant``
    | ``template`` | ``no_supervised_tokens`` | ``too_long``.
    """

    url: str
    line: int
    kind: str
    reason: str
    raw: str
    raw_truncated: bool = False

    @property
    def error(self) -> ConversationError:
        return ConversationError(self.kind, self.reason, url=self.url, line=self.line)

    def __str__(self) -> str:
        return str(self.error)


@dataclass(frozen=True)
class TokenizedConversation:
    """One conversation, ready to publish as a prompt."""

    index: int
    prompt_id: str
    input_ids: list[int]
    loss_mask: list[int]
    url: str
    line: int
    truncated: bool = False
    record_id: str | None = None
    dropped_leading_assistant: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)

    def source(self) -> dict[str, str]:
        meta = {"url": self.url, "line": str(self.line)}
        if self.record_id is not None:
            meta["id"] = self.record_id
        if self.truncated:
            meta["truncated"] = "1"
        return meta

    def to_prompt(self, run_id: str) -> Prompt:
        return Prompt(
            run_id=run_id,
            prompt_id=self.prompt_id,
            input_ids=self.input_ids,
            loss_mask=self.loss_mask,
            source=self.source(),
        )


# -- record shape --------------------------------------------------------------------------


def normalize_messages(record: Any) -> list[dict[str, str]]:
    """ShareGPT or OpenAI record -> ``[{"role", "content"}]`` with roles user/assistant/system.

    Raises :class:`ConversationError` (kinds ``schema``, ``role``, ``empty``) on anything else.
    """
    if not isinstance(record, Mapping):
        raise ConversationError("schema", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
        where = "conversations"
    elif "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
        where = "messages"
    else:
        raise ConversationError("schema", "no `conversations` (ShareGPT) or `messages` (OpenAI) field")
    if not isinstance(turns, list):
        raise ConversationError("schema", f"`{where}` is a {type(turns).__name__}, not a list")
    if not turns:
        raise ConversationError("empty", f"`{where}` is empty")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ConversationError("schema", f"{where}[{i}] is not an object")
        if role_key not in turn:
            raise ConversationError("schema", f"{where}[{i}] has no `{role_key}`")
        if text_key not in turn:
            raise ConversationError("schema", f"{where}[{i}] has no `{text_key}`")
        raw_role = turn[role_key]
        role = _ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise ConversationError(
                "role",
                f"{where}[{i}].{role_key} = {str(raw_role)[:40]!r} is not one of " f"{sorted(_ROLES)}",
            )
        messages.append({"role": role, "content": _text(turn[text_key], f"{where}[{i}]")})
    return messages


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                raise ConversationError("schema", f"{where} has a non-text content part")
            if not isinstance(part.get("text"), str):
                raise ConversationError("schema", f"{where} has a text part without a string `text`")
            parts.append(part["text"])
        return "".join(parts)
    raise ConversationError("schema", f"{where} content is a {type(value).__name__}, not a string")


# -- files ---------------------------------------------------------------------------------


def read_conversations(
    url: str | os.PathLike[str],
    tokenizer: Any,
    *,
    max_length: int = 2048,
    policy: Policy = "fail",
    assistant_turns: AssistantTurns = "all",
    start_index: int = 0,
    template_kwargs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[TokenizedConversation | MalformedLine]:
    """Stream one JSONL file of conversations as tokenized prompts (and, under ``"dlq"``, bad lines).

    A record's index is ``start_index + line_number - 1`` (blank lines count but yield
    nothing), so prompt ids do not shift when a bad line is dropped or the file is re-read;
    give each file of a multi-file source its own ``start_index`` range. A line longer than
    ``max_line_bytes`` is a malformed line (``too_long``), read past without being held in memory.
    """
    if policy not in ("dlq", "fail"):
        raise ConfigError("source.policy", f"unknown policy {policy!r}", "use 'dlq' or 'fail'")
    if max_length < 1:
        raise ConfigError("source.max_length", f"must be positive, got {max_length}")
    check_tokenizer(tokenizer)
    name = os.fspath(url)
    with fsspec.open(name, "rb", compression="infer", **(storage_options or {})) as fh:
        for line_number, (raw_bytes, size) in enumerate(_bounded_lines(fh, max_line_bytes), start=1):
            if size > max_line_bytes:
                item: TokenizedConversation | MalformedLine | None = MalformedLine(
                    url=name, line=line_number, kind="too_long",
                    reason=f"the line has {size} bytes, above data.max_line_bytes {max_line_bytes}",
                    raw=raw_bytes[:_RAW_LIMIT].decode("utf-8", errors="replace"), raw_truncated=True,
                )  # fmt: skip
                if policy == "fail":
                    raise item.error
                yield item
                continue
            item = _one_line(
                raw_bytes,
                url=name,
                line=line_number,
                index=start_index + line_number - 1,
                tokenizer=tokenizer,
                max_length=max_length,
                assistant_turns=assistant_turns,
                template_kwargs=template_kwargs or {},
            )
            if item is None:
                continue
            if isinstance(item, MalformedLine) and policy == "fail":
                raise item.error
            yield item


def _bounded_lines(fh: Any, limit: int) -> Iterator[tuple[bytes, int]]:
    """Lines with their full size; a line above ``limit`` keeps only its head (memory stays bounded)."""
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        size = len(line)
        if size > limit and not line.endswith(b"\n"):
            head = line
            while True:  # skip the rest of the long line in bounded chunks
                chunk = fh.readline(1 << 20)
                size += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield head, size
            continue
        yield line, size


def _one_line(
    raw_bytes: bytes,
    *,
    url: str,
    line: int,
    index: int,
    tokenizer: Any,
    max_length: int,
    assistant_turns: AssistantTurns,
    template_kwargs: Mapping[str, Any],
) -> TokenizedConversation | MalformedLine | None:
    def bad(kind: str, reason: str, raw: str) -> MalformedLine:
        return MalformedLine(
            url=url,
            line=line,
            kind=kind,
            reason=reason,
            raw=raw[:_RAW_LIMIT],
            raw_truncated=len(raw) > _RAW_LIMIT,
        )

    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad("encoding", f"not UTF-8: {exc}", raw_bytes.decode("utf-8", "replace"))
    if line == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return bad("json", f"not valid JSON: {exc}", text.rstrip("\n"))
    try:
        messages = normalize_messages(record)
        dropped = False
        while messages and messages[0]["role"] == "assistant":
            messages = messages[1:]
            dropped = True
        if not any(m["role"] == "assistant" for m in messages):
            raise ConversationError("no_assistant", "no assistant turn to learn from")
        input_ids, loss_mask, truncated = tokenize_conversation(
            tokenizer,
            messages,
            max_length=max_length,
            assistant_turns=assistant_turns,
            template_kwargs=template_kwargs,
        )
        if not any(loss_mask):
            raise ConversationError(
                "no_supervised_tokens",
                f"no assistant token within the first {max_length} tokens "
                f"(the conversation has {len(input_ids)}{'+' if truncated else ''})",
            )
    except ConversationError as exc:
        return bad(exc.kind, exc.reason, text.rstrip("\n"))
    record_id = record.get("id") if isinstance(record, Mapping) else None
    return TokenizedConversation(
        index=index,
        prompt_id=prompt_id_for(index, input_ids),
        input_ids=input_ids,
        loss_mask=loss_mask,
        url=url,
        line=line,
        truncated=truncated,
        record_id=str(record_id) if isinstance(record_id, (str, int)) else None,
        dropped_leading_assistant=dropped,
    )
