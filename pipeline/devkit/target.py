"""A tiny Llama-architecture target with a Llama-3-style tokenizer, built entirely locally.

For tests, the quickstart and CI: nothing comes from a hub. The model (eagle3-spec section 6:
4 layers, hidden 64, 4 heads, SwiGLU 256, vocab 512, RoPE theta 1e4) is trained for a few
hundred CPU steps on the Markov chats of :mod:`pipeline.devkit.chats`, so it has a learnable,
low-entropy next-token distribution.

:func:`build_tiny_target` caches the result under ``$SPECSTREAM_HOME/tiny-target/`` (default
``~/.cache/specstream/tiny-target/``) keyed by a hash of every build parameter; concurrent
builders each build into a private temp dir and atomically rename it into place, the first
rename wins and the others reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from pipeline.core.feedback import NullBar, OpenProgress, Progress
from pipeline.devkit.chats import CHAIN_SEED, WORDS, markov_conversations

__all__ = (
    "TINY_AUX_LAYER_IDS",
    "TINY_MODEL_CONFIG",
    "LLAMA3_SPECIALS",
    "build_tiny_tokenizer",
    "build_tiny_target",
    "tiny_target_dir",
    "default_cache_root",
)

logger = logging.getLogger(__name__)

#: Bump when anything that changes the built artifacts changes (invalidates every cache).
BUILD_VERSION = 1
#: Aux layers for the 4-layer target (the default formula collapses to [1, 1, 0] there).
TINY_AUX_LAYER_IDS = (0, 1, 2)
TINY_MODEL_CONFIG: Mapping[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rope_theta": 1e4,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}
#: Training recipe (part of the cache key).
TRAIN_RECIPE: Mapping[str, Any] = {
    "conversations": 3000,
    "steps": 200,
    "batch_size": 8,
    "row_length": 128,
    "lr": 1e-2,
    "warmup": 20,
    "weight_decay": 0.0,
    "betas": (0.9, 0.95),
}

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
    "<|unk|>",
)
_LLAMA3_PLAIN = ("\n", "\n\n", "system", "user", "assistant")
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>")
_CHATML_PLAIN = ("\n", "system", "user", "assistant", "You", "are", "a", "helpful", ".")
# Qwen2.5-shaped: a default system prompt when the conversation has none, role on its own line,
# and a newline after every end-of-turn token.
_CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- tokenizers ---------------------------------------------------------------------------


def build_tiny_tokenizer(style: Literal["llama3", "chatml"] = "llama3") -> Any:
    """A word-level fast tokenizer with a chat template, built in memory.

    ``"llama3"`` is the tiny target's tokenizer (exactly 512 ids: 7 special tokens, the
    newline tokens and role names, then the 500 chain words). ``"chatml"`` shares the words
    but has a Qwen2.5-shaped template (``<|im_start|>`` / ``<|im_end|>\\n``, default system
    prompt); it exists to test that loss masks work for templates of other shapes.
    """
    from transformers import PreTrainedTokenizerFast  # lazy: transformers is optional

    specials: tuple[str, ...]
    plain: tuple[str, ...]
    if style == "llama3":
        specials, plain, template = LLAMA3_SPECIALS, _LLAMA3_PLAIN, _LLAMA3_TEMPLATE
        named = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|pad|>",
            "unk_token": "<|unk|>",
        }
    elif style == "chatml":
        specials, plain, template = CHATML_SPECIALS, _CHATML_PLAIN, _CHATML_TEMPLATE
        named = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<|unk|>"}
    else:
        raise ValueError(f"unknown tokenizer style {style!r}: use 'llama3' or 'chatml'")
    vocab = {token: i for i, token in enumerate((*specials, *plain, *WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # spaces and tabs separate words and vanish; runs of newlines are tokens
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **named)
    fast.chat_template = template
    if style == "llama3" and len(fast) != TINY_MODEL_CONFIG["vocab_size"]:
        raise AssertionError(f"tiny tokenizer has {len(fast)} ids, expected 512")
    return fast


# -- the target model ---------------------------------------------------------------------


def default_cache_root() -> Path:
    """Where built targets are cached, so tests and the quickstart build one only once."""
    home = os.environ.get("SPECSTREAM_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "specstream"
    return base / "tiny-target"


def _build_key(seed: int) -> str:
    import transformers  # lazy: transformers is optional

    params = {
        "build_version": BUILD_VERSION,
        "model": dict(TINY_MODEL_CONFIG),
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in TRAIN_RECIPE.items()},
        "chain_seed": CHAIN_SEED,
        "seed": seed,
        "words": hashlib.sha256("\n".join(WORDS).encode()).hexdigest(),
        "template": hashlib.sha256(_LLAMA3_TEMPLATE.encode()).hexdigest(),
        "transformers_major": transformers.__version__.split(".")[0],
    }
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_MARKER = "specstream-tiny.json"


def tiny_target_dir(directory: Path | None = None, *, seed: int = 0) -> Path:
    """Where :func:`build_tiny_target` puts (or finds) the target, without building it."""
    root = Path(directory).expanduser() if directory is not None else default_cache_root()
    return root / f"tiny-llama-{_build_key(seed)}"


def build_tiny_target(directory: Path | None = None, *, seed: int = 0, progress: OpenProgress | None = None) -> Path:
    """Build (or reuse) the tiny trained target; returns its model directory.

    ``directory`` is the cache root (default :func:`default_cache_root`); the model lands in
    ``<root>/tiny-llama-<key>`` with ``config.json``, ``model.safetensors`` and the tokenizer
    files, and a ``specstream-tiny.json`` marker (build parameters and training metrics)
    written last. Safe against concurrent builders (temp dir + atomic rename). ``progress``
    opens a bar over the training steps when it builds (nothing when the cache has it).
    """
    final = tiny_target_dir(directory, seed=seed)
    root, key = final.parent, final.name.removeprefix("tiny-llama-")
    if (final / _MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-llama-{key}-", dir=root))
    try:
        started = time.perf_counter()
        metrics = _train_and_save(staging, seed=seed, progress=progress)
        metrics["build_seconds"] = round(time.perf_counter() - started, 2)
        marker = {"key": key, "seed": seed, "chain_seed": CHAIN_SEED, **metrics}
        (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(staging, final)
        except OSError:
            # Another process renamed its build first (the target exists and is not empty),
            # or a stale incomplete directory is in the way.
            if not (final / _MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(staging, final)
        else:
            logger.info("built tiny target %s in %.1f s", final, metrics["build_seconds"])
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _train_and_save(out_dir: Path, *, seed: int, progress: OpenProgress | None = None) -> dict[str, Any]:
    from transformers import LlamaConfig  # lazy: transformers is optional

    tokenizer = build_tiny_tokenizer("llama3")
    cfg = dict(TINY_MODEL_CONFIG)
    rope_theta = cfg.pop("rope_theta")
    config = LlamaConfig(
        **cfg,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    rows = _packed_training_rows(tokenizer, seed=seed)

    threads = torch.get_num_threads()
    # One thread: these ops are too small to gain from more, and OpenMP workers spinning on
    # a machine shared with other jobs make a 2-thread build 5-10x slower, not faster.
    torch.set_num_threads(1)
    try:
        bar = progress("tiny target", total=TRAIN_RECIPE["steps"], unit="step") if progress else NullBar()
        try:
            return _train(model_config=config, tokenizer=tokenizer, rows=rows, seed=seed, out_dir=out_dir, bar=bar)
        finally:
            bar.close()
    finally:
        torch.set_num_threads(threads)


def _train(*, model_config: Any, tokenizer: Any, rows: Any, seed: int, out_dir: Path, bar: Progress) -> dict[str, Any]:
    from transformers import LlamaForCausalLM  # lazy: transformers is optional

    recipe = TRAIN_RECIPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config)
        model.train()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=recipe["lr"],
            betas=recipe["betas"],
            weight_decay=recipe["weight_decay"],
        )
        steps, warmup, batch_size = recipe["steps"], recipe["warmup"], recipe["batch_size"]

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(steps - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        losses = []
        order = torch.randperm(len(rows), generator=generator)
        cursor = 0
        for _ in range(steps):
            if cursor + batch_size > len(order):
                order = torch.randperm(len(rows), generator=generator)
                cursor = 0
            batch = rows[order[cursor : cursor + batch_size]]
            cursor += batch_size
            # packed rows, no padding: plain causal attention over whole conversations
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1, loss=f"{losses[-1]:.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-20:]
    return {
        "train_steps": len(losses),
        "train_rows": len(rows),
        "initial_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
    }


def _packed_training_rows(tokenizer: Any, *, seed: int) -> Any:
    """Chat-templated Markov conversations, concatenated, cut into ``row_length`` rows.

    Every conversation starts with ``<|begin_of_text|>``, so rows hold whole conversations
    (plus a cut one at each end) and the model learns the template as well as the chain.
    """
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    records = markov_conversations(TRAIN_RECIPE["conversations"], seed=1_000_003 * (seed + 1))
    stream: list[int] = []
    for record in records:
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = TRAIN_RECIPE["row_length"]
    usable = len(stream) // width * width
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, width)
