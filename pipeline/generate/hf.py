"""Hugging Face target backend: any local causal LM directory, CPU or GPU, eager PyTorch.

Capture, per batch of prompts (right padding + attention mask, ``use_cache=False``):

- ``aux_hidden_states``: the outputs of decoder layers ``aux_layer_ids`` (HF
  ``hidden_states[i + 1]``: the pre-norm residual stream), concatenated in ascending order.
  Taken by forward hooks on just those three layers, so nothing else is kept in memory.
- ``final_hidden_states``: the decoder's ``last_hidden_state``, i.e. after the final norm, the
  exact input of ``lm_head``. The decoder stack (``model.get_decoder()``) is called instead of
  the causal-LM wrapper, so no (L, V) logits are ever computed.

When the decoder layers cannot be located unambiguously the backend falls back to the generic
``output_hidden_states=True`` path (every layer materialised, then three kept). There the last
entry of ``hidden_states`` is the *post-norm* state (transformers ties it to
``last_hidden_state``), so aux layer ``N - 1`` is refused in that mode rather than captured wrong.

Batches are formed from the prompts sorted by length (longest first) under a token budget
(``batch_tokens`` >= rows x padded width); results come back in the caller's order.

Numerics (measured on CPU, fp32, torch 2.15): a capture is bit-identical to a reference
``output_hidden_states=True`` forward of the same padded batch. Across *different* padded widths
a row can differ in the last bit (~1e-6): PyTorch's CPU SDPA (flash) kernel splits the queries
into blocks and computes a final partial block differently from a full one (only positions past
the last multiple of 16 differ; with ``attn_implementation="eager"`` lengths >= 16 are exact),
and sgemm takes another path for fewer than 16 rows. Right padding itself is harmless: with the
same width, a row's values do not depend on the other rows or on B. So ``pad_to_multiple_of``
>= the longest prompt makes captures independent of batch composition; the default (no rounding)
trades that for less padding. GPU kernels give no such guarantee in either mode.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.core.errors import CaptureContractError, ConfigError
from pipeline.core.messages import TargetInfo
from pipeline.generate.backend import (
    BaseTarget,
    Capture,
    PromptTokens,
    assemble_features,
    dtype_name,
    normalize_prompts,
    resolve_aux_layer_ids,
    weights_fingerprint,
)

__all__ = ("HFTarget", "plan_batches", "padded_width")

logger = logging.getLogger(__name__)

CaptureMode = Literal["auto", "hooks", "hidden_states"]
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, *, pad_to_multiple_of: int = 1
) -> list[list[int]]:
    """Group prompt indices into batches whose padded size (rows x width) fits the budget.

    Longest first, so each batch pads to its first row (rounded up to ``pad_to_multiple_of``);
    a prompt longer than the budget runs alone. Deterministic for a given list of lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = padded_width(lengths[current[0]] if current else lengths[index], pad_to_multiple_of)
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def padded_width(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple, so padded batches reuse a few kernel shapes."""
    return -(-length // multiple) * multiple


class HFTarget(BaseTarget):
    """A local Hugging Face causal LM as an EAGLE3 target.

    ``model_dir``: a local directory with ``config.json`` and ``*.safetensors`` (nothing is
    downloaded, pickled weights are refused). ``dtype``: ``None`` = float32 on CPU, the
    checkpoint's own half precision (else bfloat16) on GPU. ``aux_layer_ids``: output-of-layer
    ids, default :func:`pipeline.core.features.default_aux_layer_ids`. ``batch_tokens``: padded
    tokens per forward pass. ``pad_to_multiple_of``: round every batch's padded width up to
    a multiple of this; set it to at least the longest prompt (the source's ``max_length``)
    and every forward pass has the same width, which makes a prompt's features independent of
    the other prompts in its batch (bit-exact on CPU; see the module docstring). ``capture_mode``:
    ``"hooks"`` (three layers kept), ``"hidden_states"`` (generic fallback) or ``"auto"``
    (hooks when the layers are found).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        aux_layer_ids: Sequence[int] | None = None,
        batch_tokens: int = 8192,
        pad_to_multiple_of: int = 1,
        model_id: str | None = None,
        attn_implementation: str | None = None,
        capture_mode: CaptureMode = "auto",
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM  # lazy: transformers is optional

        self.model_dir = Path(model_dir).expanduser()
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(
                "target.model",
                f"{self.model_dir} is not a local Hugging Face model directory (no config.json)",
                "download the model first (e.g. `hf download <id> --local-dir DIR`) and pass DIR",
            )
        if batch_tokens < 1:
            raise ConfigError("target.batch_tokens", f"must be positive, got {batch_tokens}")
        if pad_to_multiple_of < 1:
            raise ConfigError("target.pad_to_multiple_of", f"must be positive, got {pad_to_multiple_of}")
        if capture_mode not in ("auto", "hooks", "hidden_states"):
            raise ConfigError(
                "target.capture_mode", f"unknown mode {capture_mode!r}", "auto, hooks or hidden_states"
            )
        revision = weights_fingerprint(self.model_dir)  # also refuses pickled-only checkpoints
        self.device = torch.device(device)
        self.batch_tokens = batch_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.dtype = self._resolve_dtype(dtype)
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        text_config = config.get_text_config()
        self.num_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(text_config.vocab_size)
        self.aux_layer_ids = resolve_aux_layer_ids(aux_layer_ids, self.num_layers)

        load_kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "local_files_only": True,
            "use_safetensors": True,
        }
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        if self.device.type != "cpu" and _has_accelerate():
            load_kwargs["device_map"] = {"": str(self.device)}
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, **load_kwargs)
        self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.decoder: nn.Module = self.model.get_decoder()
        self.pad_token_id = _pad_id(self.model.config, text_config)

        self._layers = _find_decoder_layers(self.decoder, self.num_layers)
        if capture_mode == "auto":
            capture_mode = "hooks" if self._layers is not None else "hidden_states"
        if capture_mode == "hooks" and self._layers is None:
            raise CaptureContractError(
                f"cannot locate the {self.num_layers} decoder layers of "
                f"{type(self.decoder).__name__} for hooks; use capture_mode='hidden_states'"
            )
        if capture_mode == "hidden_states" and self.num_layers - 1 in self.aux_layer_ids:
            raise CaptureContractError(
                f"aux layer {self.num_layers - 1} (the last decoder layer) cannot be captured "
                "pre-norm through output_hidden_states, whose last entry is post-norm; "
                "use capture_mode='hooks' or an earlier layer"
            )
        self.capture_mode: str = capture_mode
        self._recording: dict[int, torch.Tensor] | None = None
        self._lock = threading.Lock()  # the hooks record into one dict: one forward at a time
        self._handles = []
        if capture_mode == "hooks":
            assert self._layers is not None
            for layer_id in self.aux_layer_ids:
                self._handles.append(self._layers[layer_id].register_forward_hook(self._hook_for(layer_id)))

        self._info = TargetInfo(
            model_id=model_id or _model_id_for(self.model_dir),
            revision=revision,
            num_layers=self.num_layers,
            aux_layer_ids=self.aux_layer_ids,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            dtype=dtype_name(self.dtype),
        )
        logger.info(
            "HF target %s (%s) on %s, %s, aux layers %s, capture by %s",
            self._info.model_id,
            self._info.revision,
            self.device,
            self._info.dtype,
            self.aux_layer_ids,
            self.capture_mode,
        )

    @property
    def info(self) -> TargetInfo:
        return self._info

    # -- capture -------------------------------------------------------------------------

    def capture(self, prompts: Sequence[PromptTokens]) -> list[Capture]:
        self._check_open()
        items = normalize_prompts(prompts, self.vocab_size)
        results: list[Capture | None] = [None] * len(items)
        lengths = [len(ids) for ids, _ in items]
        for batch in plan_batches(lengths, self.batch_tokens, pad_to_multiple_of=self.pad_to_multiple_of):
            aux, final = self.forward([items[i][0] for i in batch])
            for row, index in enumerate(batch):
                ids, mask = items[index]
                length = len(ids)
                results[index] = assemble_features(
                    ids,
                    mask,
                    aux[row, :length],
                    final[row, :length],
                    hidden_size=self.hidden_size,
                    info=self._info,
                )
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def forward(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded forward pass: ``(aux (B, T, 3H), final (B, T, H))`` on the CPU.

        Rows are right-padded to the longest sequence; positions past a row's length hold
        padding garbage and must be cut by the caller.
        """
        width = padded_width(max(len(s) for s in sequences), self.pad_to_multiple_of)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)

        with self._lock:
            if self.capture_mode == "hooks":
                layers, final = self._run_with_hooks(input_ids, attention_mask)
            else:
                layers, final = self._run_with_hidden_states(input_ids, attention_mask)
        expected = (len(sequences), width, self.hidden_size)
        for layer_id, tensor in zip(self.aux_layer_ids, layers, strict=True):
            if tuple(tensor.shape) != expected:
                raise CaptureContractError(
                    f"decoder layer {layer_id} produced shape {tuple(tensor.shape)}, expected {expected}"
                )
        aux = torch.cat(layers, dim=-1)
        return aux.to("cpu"), final.to("cpu")

    def _run_with_hooks(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        self._recording = {}
        try:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            recorded = self._recording
        finally:
            self._recording = None
        missing = [i for i in self.aux_layer_ids if i not in recorded]
        if missing:
            raise CaptureContractError(f"decoder layers {missing} did not run in the forward")
        return [recorded[i] for i in self.aux_layer_ids], out.last_hidden_state

    def _run_with_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
        )
        hidden_states = out.hidden_states
        if hidden_states is None or len(hidden_states) != self.num_layers + 1:
            got = None if hidden_states is None else len(hidden_states)
            raise CaptureContractError(
                f"output_hidden_states returned {got} states, expected "
                f"{self.num_layers + 1} (embeddings + one per layer)"
            )
        final = getattr(out, "last_hidden_state", None)
        if final is None:
            final = hidden_states[-1]
        return [hidden_states[i + 1] for i in self.aux_layer_ids], final

    def _hook_for(self, layer_id: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._recording is None:
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._recording[layer_id] = hidden.detach()

        return hook

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        del self.model, self.decoder, self._layers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- helpers -------------------------------------------------------------------------

    def _resolve_dtype(self, dtype: torch.dtype | str | None) -> torch.dtype:
        if isinstance(dtype, torch.dtype):
            return dtype
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ConfigError("target.dtype", f"unknown dtype {dtype!r}", f"one of {sorted(_DTYPES)}")
            return _DTYPES[dtype]
        if self.device.type == "cpu":
            return torch.float32
        declared = _declared_dtype(self.model_dir)
        return declared if declared in (torch.bfloat16, torch.float16) else torch.bfloat16


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401  # lazy: accelerate is optional (transformers' device_map)
    except ImportError:
        return False
    return True


def _declared_dtype(model_dir: Path) -> torch.dtype | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(name) if isinstance(name, str) else None


def _pad_id(config: Any, text_config: Any) -> int:
    """Any valid id works for right padding (masked out, sliced off); prefer the pad token."""
    for source in (text_config, config):
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(source, key, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and value >= 0:
                return value
    return 0


def _find_decoder_layers(decoder: nn.Module, num_layers: int) -> nn.ModuleList | None:
    """The decoder's stack of ``num_layers`` blocks, or None when not found unambiguously."""
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
        return layers
    candidates = [
        module
        for _, module in decoder.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    return candidates[0] if len(candidates) == 1 else None


def _model_id_for(model_dir: Path) -> str:
    """``org/name`` for a hub-cache snapshot path, else the directory name."""
    resolved = model_dir.resolve()
    for part in reversed(resolved.parts):
        match = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return resolved.name or str(resolved)
