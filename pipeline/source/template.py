"""A chat template and its tokenizer -> token ids with assistant-only loss masks, for any template.

The loss mask is 1 exactly on the assistant replies: the reply text and whatever the template
closes the turn with (``<|eot_id|>`` for Llama 3, ``<|im_end|>\\n`` for ChatML); headers, system
and user turns are 0. It is found without knowing the template: for assistant message i, the
reply's characters are those that ``render(messages[:i + 1])`` adds to ``render(messages[:i],
add_generation_prompt=True)``; the fast tokenizer's offset mapping then marks every token
overlapping one of those spans. A template for which these renders are not prefixes of the full
render (e.g. one that rewrites earlier turns) raises a ``ConversationError`` instead of guessing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pipeline.core.errors import ConfigError, ConversationError

__all__ = ("AssistantTurns", "load_tokenizer", "check_tokenizer", "assistant_spans", "tokenize_conversation")

AssistantTurns = Literal["all", "last"]


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The fast tokenizer of a local model directory (nothing is downloaded)."""
    from transformers import AutoTokenizer  # lazy: transformers is optional

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer the masks cannot work with: a slow one (no offsets), or no template."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "source.tokenizer",
            f"{type(tokenizer).__name__} is not a fast tokenizer (no offset mapping)",
            "use a model whose tokenizer.json loads as a fast tokenizer",
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "source.tokenizer",
            "the tokenizer has no chat_template",
            "use an instruct model's tokenizer or set tokenizer.chat_template",
        )


def _render(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool,
    template_kwargs: Mapping[str, Any],
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
    except Exception as exc:  # jinja errors, raise_exception() in templates, ...
        raise ConversationError("template", f"the chat template failed: {exc}") from None
    if not isinstance(text, str):
        raise ConversationError("template", f"the chat template returned {type(text).__name__}")
    return text


def assistant_spans(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    assistant_turns: AssistantTurns = "all",
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans of assistant replies.

    A span starts where the template's generation prompt ends and ends where the rendered turn
    ends, so it holds the reply plus the template's end-of-turn text.
    """
    kwargs = dict(template_kwargs or {})
    full = _render(tokenizer, messages, add_generation_prompt=False, template_kwargs=kwargs)
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if assistant_turns == "last":
        indices = indices[-1:]
    spans = []
    for i in indices:
        if i == 0:
            raise ConversationError("schema", "an assistant turn cannot open the conversation")
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True, template_kwargs=kwargs)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, template_kwargs=kwargs)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise ConversationError(
                "template",
                f"the chat template does not render assistant turn {i} as an extension of "
                "the conversation before it (prefix-unstable template); use "
                "assistant_turns='last' or a template that renders earlier turns unchanged",
            )
        if len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
    return full, spans


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    max_length: int | None = None,
    assistant_turns: AssistantTurns = "all",
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[int], list[int], bool]:
    """``(input_ids, loss_mask, truncated)`` for normalized messages (see module docstring)."""
    text, spans = assistant_spans(
        tokenizer, messages, assistant_turns=assistant_turns, template_kwargs=template_kwargs
    )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    loss_mask = [0] * len(input_ids)
    j = 0
    for t, (start, end) in enumerate(offsets):
        end = max(end, start + 1)  # a zero-width token counts at its position
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and start < spans[j][1] and end > spans[j][0]:
            loss_mask[t] = 1
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    return input_ids, loss_mask, truncated
