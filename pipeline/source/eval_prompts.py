"""The held-out eval set: ``data.eval_path`` -> prompts of the run's eval sub-run, exactly once.

The eval conversations go through the same reader and chat template as the training data, but
to their own topics (``RunTopics.eval``: the sub-run ``<run>.eval``, one partition) through
their own :class:`~pipeline.source.publisher.PromptPublisher`: its own transactions, its own
end-of-stream marker, its own counts in the ``<run>.eval.source`` group (a restart skips what
an earlier attempt committed, as for the training prompts). So an eval conversation is never in
the training prompts topic, never in the run's training totals, and never counted towards the
draft vocabulary. The generators capture it once (:mod:`pipeline.generate.eval_capture`); rank
0 of the trainer evaluates on it (:mod:`pipeline.train.evaluate`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from pipeline.core.background import in_background
from pipeline.core.messages import DeadLetter, Prompt
from pipeline.core.topics import RunTopics, Transport
from pipeline.source.conversations import MalformedLine, read_conversations
from pipeline.source.publisher import PromptPublisher, SourceStats

if TYPE_CHECKING:
    from pipeline.source.stage import SourceConfig

__all__ = ("publish_eval_set",)

logger = logging.getLogger(__name__)

#: The eval set's records in file order: its prompts, and dead letters for its malformed lines.
Items = list[Prompt | DeadLetter]


def publish_eval_set(
    transport: Transport,
    config: SourceConfig,
    tokenizer: Any,
    *,
    dead_letter: Callable[[str, MalformedLine], DeadLetter],
    stop: threading.Event | None = None,
) -> Future[SourceStats]:
    """Publish ``config.eval_data`` to the eval sub-run's prompts topic and close it, on a
    thread beside the training prompts' publishing: its topics, its producer's start and its
    transactions are broker round trips the training source need not wait for.

    The eval conversations are read and tokenized first, on the caller's thread (a tokenizer is
    not safe to share between threads; an eval set is small). ``dead_letter`` turns a malformed
    line into the eval sub-run's dead letter (the stage's own rule). Safe to rerun: an eval set
    already published is skipped, a half-published one continues."""
    assert config.eval_data is not None
    items = list(_items(config, tokenizer, RunTopics(config.run_id).eval.run_id, dead_letter))
    return in_background("source-eval", _publish, transport, config, items, stop)


def _publish(transport: Transport, config: SourceConfig, items: Items, stop: threading.Event | None) -> SourceStats:
    topics = RunTopics(config.run_id).eval
    with transport.admin() as admin:
        admin.ensure_run_topics(topics, 1, config.topic_policy)
    publisher = PromptPublisher(
        transport, topics.run_id, 1,
        chunk_size=config.chunk_size, transaction_timeout_ms=config.transaction_timeout_ms,
    )  # fmt: skip
    stats = publisher.publish(items, stop=stop)
    logger.info(
        "eval set %s: %d prompts (%d published now, %d already committed), %d malformed",
        config.eval_data,
        stats.published + stats.skipped,
        stats.published,
        stats.skipped,
        stats.dead_letters,
    )
    return stats


def _items(
    config: SourceConfig, tokenizer: Any, eval_run_id: str, dead_letter: Callable[[str, MalformedLine], DeadLetter]
) -> Iterator[Prompt | DeadLetter]:
    """The eval prompts in file order (dead letters for bad lines, under the run's policy)."""
    assert config.eval_data is not None
    for item in read_conversations(
        config.eval_data,
        tokenizer,
        max_length=config.max_length,
        policy=config.on_malformed,  # type: ignore[arg-type]
        assistant_turns=config.assistant_turns,  # type: ignore[arg-type]
        storage_options=config.storage_options,
        max_line_bytes=config.max_line_bytes,
    ):
        if isinstance(item, MalformedLine):
            logger.warning("malformed eval conversation %s", item)
            yield dead_letter(eval_run_id, item)
            continue
        yield item.to_prompt(eval_run_id)
