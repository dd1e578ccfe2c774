"""The source stage: conversations -> tokenized prompts on the prompts topic, plus the draft vocab.

:class:`SourceStage` reads JSONL conversations (ShareGPT or OpenAI, any fsspec URL) through
:func:`pipeline.source.conversations.read_conversations` (chat template, assistant-only loss masks,
truncation, deterministic prompt ids from the line position), counts the supervised tokens, and
publishes the prompts with :class:`PromptPublisher`. Before the end-of-stream markers are
committed it stores the draft vocabulary mapping (``d2t``/``t2d``) beside the run's features
(``<storage root>/<run>/vocab_mapping.safetensors``), so a partition that has ended always has
its mapping. A malformed line goes to the DLQ with its file and line number (``on_malformed:
dlq``), or stops the run (``fail``): every open partition is closed with a *failed* marker that
carries the reason, so generators and trainers stop with it instead of waiting.

The prompts go out through :class:`~pipeline.source.publisher.PromptPublisher` (exactly once,
restartable: it learns what an earlier attempt committed from the source's counts, one offsets
request, never by reading the prompts topic). A restart reads the whole input again (so the
token counts are complete) and refuses a vocabulary mapping that differs from the stored one:
the data changed between the attempts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.deadletter import DeadLetterLimits, DeadLetterPolicy
from pipeline.core.errors import ConfigError, RunMismatchError
from pipeline.core.heartbeat import HeartbeatPublisher
from pipeline.core.messages import DeadLetter, Prompt, now
from pipeline.core.model_dir import read_text_config
from pipeline.core.topic_plan import TopicPolicy
from pipeline.core.topics import Transport
from pipeline.source.conversations import DEFAULT_MAX_LINE_BYTES, MalformedLine, read_conversations
from pipeline.source.eval_prompts import publish_eval_set
from pipeline.source.publisher import PromptPublisher, SourceStats
from pipeline.source.template import load_tokenizer
from pipeline.storage import FeatureStore
from pipeline.vocab import TokenCounter, VocabMapping, build_vocab_mapping

__all__ = ("SourceConfig", "SourceResult", "SourceStage", "VOCAB_MAPPING_URI", "read_vocab_mapping")

logger = logging.getLogger(__name__)

#: Where the draft vocabulary mapping lives, relative to the run's storage root.
VOCAB_MAPPING_URI = "vocab_mapping.safetensors"


@dataclass(frozen=True)
class SourceConfig:
    """What the source stage reads and how.

    ``data``: one or more JSONL URLs, read in order (prompt ids continue across files).
    ``tokenizer``: a local model directory (its tokenizer and chat template; its ``config.json``
    ``vocab_size`` sizes ``t2d``). ``draft_vocab_size``: the draft's vocabulary (clamped to the
    target's). ``limit``: only the first N conversations (good and bad lines both count).
    """

    run_id: str
    data: str | Sequence[str]
    tokenizer: str
    partitions: int
    storage_root: str
    max_length: int = 2048
    on_malformed: str = "dlq"  # "dlq" | "fail"
    draft_vocab_size: int = 32000
    target_vocab_size: int | None = None
    limit: int | None = None
    assistant_turns: str = "all"
    chunk_size: int = 256
    dead_letters: DeadLetterLimits = DeadLetterLimits()
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    transaction_timeout_ms: int = 60_000
    storage_options: dict[str, Any] = field(default_factory=dict)
    eval_data: str | None = None  # held-out conversations: the eval sub-run's prompts, never trained
    heartbeat_interval_s: float | None = None  # publish a heartbeat this often (None: none)
    topic_policy: TopicPolicy | None = None  # replicas and retention of the eval sub-run's topics

    def urls(self) -> list[str]:
        return [self.data] if isinstance(self.data, (str, os.PathLike)) else list(self.data)


@dataclass
class SourceResult:
    """What the source did, and where the trainer finds the vocabulary mapping."""

    stats: SourceStats
    prompts: int = 0
    malformed: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    vocab_mapping_uri: str = VOCAB_MAPPING_URI
    vocab_mapping_url: str = ""
    vocab_fingerprint: str = ""
    draft_vocab_size: int = 0
    target_vocab_size: int = 0
    eval_prompts: int = 0  # held-out prompts on the eval topic (not in ``prompts``)


class SourceStage:
    """Conversations in, prompts and the draft vocabulary mapping out (see module docstring)."""

    def __init__(self, transport: Transport, config: SourceConfig, *, tokenizer: Any = None) -> None:
        if config.on_malformed not in ("dlq", "fail"):
            raise ConfigError("data.on_malformed", f"unknown policy {config.on_malformed!r}", "use dlq or fail")
        if config.partitions < 1:
            raise ConfigError("data.partitions", f"must be positive, got {config.partitions}")
        self.transport = transport
        self.config = config
        self._tokenizer = tokenizer
        self.store = FeatureStore(config.storage_root, config.run_id, storage_options=config.storage_options)

    def run(self, stop: threading.Event | None = None) -> SourceResult:
        """Publish every prompt and store the vocabulary mapping; safe to rerun after a crash.

        ``stop`` (SIGINT/SIGTERM) aborts the open chunk and returns (``result.stats.stopped``)."""
        result = SourceResult(stats=SourceStats())
        heartbeat = HeartbeatPublisher(
            self.transport, self.config.run_id, "source", "source", self.config.heartbeat_interval_s,
            lambda: {"prompts": result.prompts, "malformed": result.malformed, "tokens": result.tokens},
        )  # fmt: skip
        with heartbeat.lifetime(stop):
            heartbeat.set_state("running")
            return self._run(result, stop)

    def _run(self, result: SourceResult, stop: threading.Event | None) -> SourceResult:
        cfg = self.config
        tokenizer = self._tokenizer if self._tokenizer is not None else load_tokenizer(cfg.tokenizer)
        target_vocab = cfg.target_vocab_size or _target_vocab_size(cfg.tokenizer, tokenizer)
        counter = TokenCounter(target_vocab)
        result.target_vocab_size = target_vocab
        publisher = PromptPublisher(
            self.transport,
            cfg.run_id,
            cfg.partitions,
            chunk_size=cfg.chunk_size,
            transaction_timeout_ms=cfg.transaction_timeout_ms,
        )
        started = time.perf_counter()
        evals = None
        if cfg.eval_data:  # published beside the training prompts
            evals = publish_eval_set(self.transport, cfg, tokenizer, dead_letter=_dead_letter, stop=stop)
        try:
            result.stats = publisher.publish(
                self._items(tokenizer, counter, result),
                before_close=lambda: self._store_vocab(counter, target_vocab, result),
                stop=stop,
            )
        except BaseException:
            if evals is not None and evals.exception() is not None:  # waits: its producer closed first
                logger.warning("publishing the eval set failed as well: %s", evals.exception())
            raise
        if evals is not None:
            eval_stats = evals.result()  # its broker calls are bounded; its error re-raised here
            result.eval_prompts = eval_stats.published + eval_stats.skipped
            result.stats.stopped = result.stats.stopped or eval_stats.stopped
        logger.info(
            "source %s: %d prompts (%d published now, %d already committed), %d malformed, "
            "%d truncated, %d supervised tokens, vocab %s, in %.1f s",
            cfg.run_id,
            result.prompts,
            result.stats.published,
            result.stats.skipped,
            result.malformed,
            result.truncated,
            result.supervised_tokens,
            result.vocab_fingerprint,
            time.perf_counter() - started,
        )
        return result

    def _items(
        self, tokenizer: Any, counter: TokenCounter, result: SourceResult
    ) -> Iterator[Prompt | DeadLetter]:
        """Prompts in source order (and dead letters for bad lines), counting tokens as they pass."""
        cfg = self.config
        policy = DeadLetterPolicy("source", cfg.dead_letters)
        seen = 0
        start = 0
        for url in cfg.urls():
            last_line = 0
            for item in read_conversations(
                url,
                tokenizer,
                max_length=cfg.max_length,
                policy=cfg.on_malformed,  # type: ignore[arg-type]
                assistant_turns=cfg.assistant_turns,  # type: ignore[arg-type]
                start_index=start,
                storage_options=cfg.storage_options,
                max_line_bytes=cfg.max_line_bytes,
            ):
                if cfg.limit is not None and seen >= cfg.limit:
                    return
                seen += 1
                last_line = item.line
                if isinstance(item, MalformedLine):
                    result.malformed += 1
                    logger.warning("malformed conversation %s", item)
                    yield _dead_letter(cfg.run_id, item)
                    policy.record(valid=False, reason=str(item))  # after its letter: it is counted
                    continue
                policy.record(valid=True)
                counter.update(item.input_ids, item.loss_mask)
                result.prompts += 1
                result.truncated += int(item.truncated)
                result.tokens += item.num_tokens
                result.supervised_tokens += item.num_supervised
                yield item.to_prompt(cfg.run_id)
            start += last_line  # the next file's ids continue after this one's lines

    def _store_vocab(self, counter: TokenCounter, target_vocab: int, result: SourceResult) -> None:
        """Build d2t/t2d from every supervised token and store it beside the features."""
        draft_vocab = min(self.config.draft_vocab_size, target_vocab)
        if draft_vocab < self.config.draft_vocab_size:
            logger.warning(
                "draft_vocab_size %d exceeds the target's %d ids: using %d",
                self.config.draft_vocab_size,
                target_vocab,
                draft_vocab,
            )
        mapping = build_vocab_mapping(counter, target_vocab, draft_vocab)
        existing = read_vocab_mapping(self.store)
        if existing is not None and existing.fingerprint() != mapping.fingerprint():
            raise RunMismatchError(
                f"run {self.config.run_id} already has a vocabulary mapping {existing.fingerprint()} "
                f"and this attempt counted {mapping.fingerprint()}: the conversations changed "
                "between attempts; use a new run id"
            )
        if existing is None:
            self.store.put_bytes(VOCAB_MAPPING_URI, mapping.to_bytes())
        result.vocab_mapping_url = self.store.resolve(VOCAB_MAPPING_URI)
        result.vocab_fingerprint = mapping.fingerprint()
        result.draft_vocab_size = draft_vocab
        logger.info("vocab mapping %s (Vd=%d of V=%d) at %s", mapping.fingerprint(), draft_vocab, target_vocab,
                    result.vocab_mapping_url)


def read_vocab_mapping(store: FeatureStore) -> VocabMapping | None:
    """The run's stored ``VocabMapping``, or None when the source has not stored it yet."""
    path = store.resolve(VOCAB_MAPPING_URI)
    try:
        data = store.fs.cat_file(path)
    except FileNotFoundError:
        return None
    return VocabMapping.from_bytes(data)


def _target_vocab_size(model_dir: str, tokenizer: Any) -> int:
    """The target's lm_head width: ``config.json`` ``vocab_size`` (padded ids included), else the
    tokenizer's length."""
    try:
        size = read_text_config(model_dir).get("vocab_size")
    except ConfigError:
        size = None
    return int(size) if isinstance(size, int) and size > 0 else len(tokenizer)


def _dead_letter(run_id: str, line: MalformedLine) -> DeadLetter:
    """A malformed input line as a dead letter: file and line number in the reason."""
    return DeadLetter(
        run_id=run_id,
        source_topic=f"source:{os.path.basename(str(line.url))}"[:255],
        partition=0,
        offset=line.line,
        error=f"ConversationError.{line.kind}"[:128],
        reason=str(line),
        payload=line.raw,
        payload_truncated=line.raw_truncated,
        created_at=now(),
    )
