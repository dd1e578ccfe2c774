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
from typing import TYPE_CHECKING, Any

from pipeline.core.messages import DeadLetter, Prompt
from pipeline.core.topics import RunTopics, Transport
from pipeline.source.conversations import MalformedLine, read_conversations
from pipeline.source.publisher import PromptPublisher, SourceStats

if TYPE_CHECKING:
    from pipeline.source.stage import SourceConfig

__all__ = ("EvalSetPublish",)

logger = logging.getLogger(__name__)

#: The eval set's records in file order: its prompts, and dead letters for its malformed lines.
Items = list[Prompt | DeadLetter]


class EvalSetPublish:
    """Publish ``config.eval_data`` to the eval sub-run's prompts topic and close it, on a
    thread beside the training prompts' publishing: its topics, its producer's start and its
    transactions are broker round trips the training source need not wait for.

    The eval conversations are read and tokenized first, on the caller's thread (a tokenizer is
    not safe to share between threads; an eval set is small). ``dead_letter`` turns a malformed
    line into the eval sub-run's dead letter (the stage's own rule). Safe to rerun: an eval set
    already published is skipped, a half-published one continues."""

    def __init__(
        self,
        transport: Transport,
        config: SourceConfig,
        tokenizer: Any,
        *,
        dead_letter: Callable[[str, MalformedLine], DeadLetter],
        stop: threading.Event | None = None,
    ) -> None:
        assert config.eval_data is not None
        self.stats: SourceStats | None = None
        self._error: BaseException | None = None
        items = list(_items(config, tokenizer, RunTopics(config.run_id).eval.run_id, dead_letter))
        self._thread = threading.Thread(
            target=self._run, args=(transport, config, items, stop), name="source-eval", daemon=True
        )
        self._thread.start()

    def _run(self, transport: Transport, config: SourceConfig, items: Items, stop: threading.Event | None) -> None:
        try:
            self.stats = _publish(transport, config, items, stop)
        except BaseException as exc:  # re-raised by ``wait`` on the stage's thread
            self._error = exc

    def wait(self) -> SourceStats:
        """The publishing's stats once it has ended (its broker calls are bounded); its error re-raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self.stats is not None
        return self.stats

    def close(self) -> None:
        """Wait for the publishing to end, keeping quiet about its error (the caller has its own)."""
        self._thread.join()
        if self._error is not None:
            logger.warning("publishing the eval set failed as well: %s", self._error)


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
