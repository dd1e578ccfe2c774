"""SGLang target backend (optional extra ``specstream[sglang]``, CUDA only).

The :class:`~pipeline.generate.backend.TargetBackend` contract over SGLang's offline
``sglang.Engine``: prompts go in as token ids (``skip_tokenizer_init``), one greedy token is
generated, and each request's ``meta_info["hidden_states"]`` is turned into the four feature
tensors by :func:`features_from_sglang_output`, a pure function that the test suite checks with
stub responses and with a stand-in engine backed by the Hugging Face backend.

What SGLang provides (read from its source and issue tracker, not run here):

- ``Engine(..., enable_return_hidden_states=True)`` plus ``generate(...,
  return_hidden_states=True)`` returns, per request, ``meta_info["hidden_states"]``: a list whose
  first entry holds one row per *prompt* token from the prefill (nested float lists made with
  ``.tolist()`` in recent releases, tensors in older ones), followed by one entry per decoded
  token. Each row is the ``LogitsProcessor`` input: the final hidden state *after* the final norm.
- The prefill entry is sliced as ``len(origin_input_ids)`` rows from the last prefill chunk, so a
  radix-cache prefix hit or chunked prefill leaves it incomplete or misaligned: the engine is
  started with ``disable_radix_cache=True`` and ``chunked_prefill_size=-1`` (no chunking).
- Aux layers (EAGLE3): a model that implements ``set_eagle3_layers_to_capture(ids)`` stores
  ``hidden_states + residual`` at the *input* of layers ``id + 1`` (= the pre-norm output of layer
  ``id``, our convention), and in FULL capture mode the logits processor then returns the
  concatenated aux states *instead of* the final hidden state. Stock SGLang calls that setter only
  for a target that serves an EAGLE3 draft, and no server argument turns it on otherwise
  (sgl-project/sglang PRs #8214 and #12183, both closed; SpecForge PR #641: "per-request
  return_hidden_states ... returns the last layer only"). SpecForge therefore drives SGLang's
  internal ``ModelRunner`` with a patched logits processor, pinned to one SGLang version.
- Layer ``N - 1`` (the last decoder layer) is never captured by that loop, so it is refused here.

Consequently this adapter needs an engine whose rows are ``[aux (3H) | final (H)]`` (width 4H,
aux first, ascending layers): a small patch of SGLang (enable ``set_eagle3_layers_to_capture``
with our ``aux_layer_ids`` at load, and in the logits processor's FULL capture store
``cat(aux, hidden_states)``), or any object passed as ``engine=`` with the same ``generate``
signature. A stock engine answers with width H (final only) or 3H (aux only) and is refused with
a :class:`~pipeline.core.errors.CaptureContractError` that says so, never silently misread.

Not verified here (no GPU, SGLang not installable): that the Engine keyword arguments below are
accepted by a given SGLang release; the exact container type of the rows; that ``max_new_tokens=1``
leaves exactly one prefill entry first; numerical agreement with the HF backend (SGLang fuses the
residual add into RMSNorm and uses its own attention kernels, so expect bf16-level differences,
not bit equality); tensor-parallel or data-parallel engines; multimodal targets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.core.errors import CaptureContractError, ConfigError
from pipeline.core.messages import TargetInfo
from pipeline.core.model_dir import read_text_config
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

__all__ = (
    "SGLangTarget",
    "SGLangEngine",
    "features_from_sglang_output",
    "prompt_hidden_rows",
    "sglang_available",
    "INSTALL_HINT",
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'specstream[sglang]' on a machine with a CUDA GPU"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class SGLangEngine(Protocol):
    """The part of ``sglang.Engine`` this adapter uses."""

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


def sglang_available() -> bool:
    """Whether the optional SGLang extra is installed (the backend needs it)."""
    try:
        import sglang  # noqa: F401  # lazy: sglang is optional (a GPU extra)
    except ImportError:
        return False
    return True


# -- the pure conversion -------------------------------------------------------------------


def prompt_hidden_rows(output: Mapping[str, Any], prompt_length: int) -> torch.Tensor:
    """The (L, D) prompt rows of one SGLang ``generate`` result (float32, on the CPU).

    Takes the first entry of ``meta_info["hidden_states"]`` (the prefill); later entries
    (decoded tokens) are ignored. A flat list of per-token rows is accepted too.
    """
    meta = output.get("meta_info") if isinstance(output, Mapping) else None
    if not isinstance(meta, Mapping):
        raise CaptureContractError("SGLang output has no meta_info")
    chunks = meta.get("hidden_states")
    if chunks is None or (isinstance(chunks, (list, tuple)) and len(chunks) == 0):
        raise CaptureContractError(
            "SGLang returned no hidden states: start the engine with "
            "enable_return_hidden_states=True and call generate(..., return_hidden_states=True)"
        )
    first = _as_tensor(chunks[0])
    if first.dim() == 1:
        # one row per entry: the prompt rows are the first L entries
        rows = torch.stack([_as_tensor(c).reshape(-1) for c in chunks[:prompt_length]])
    elif first.dim() == 2:
        rows = first
    elif first.dim() == 3 and first.shape[0] == 1:
        rows = first[0]
    else:
        raise CaptureContractError(
            f"SGLang prefill hidden states have shape {tuple(first.shape)}, expected (L, D)"
        )
    if rows.shape[0] != prompt_length:
        raise CaptureContractError(
            f"SGLang returned {rows.shape[0]} prefill rows for a {prompt_length}-token prompt: "
            "a radix-cache hit or chunked prefill cuts them; start the engine with "
            "disable_radix_cache=True and chunked_prefill_size=-1"
        )
    return rows


def features_from_sglang_output(
    output: Mapping[str, Any],
    input_ids: Sequence[int],
    loss_mask: Sequence[int],
    *,
    hidden_size: int,
    dtype: torch.dtype = torch.bfloat16,
    info: TargetInfo | None = None,
) -> Capture:
    """One SGLang result -> the four feature tensors (rows laid out ``[aux 3H | final H]``).

    Values are cast to ``dtype`` (the engine's: bf16 rows round-trip exactly through the
    float lists SGLang returns). A width of H or 3H means a stock engine that returns only
    the final or only the aux states; both are refused with an explanation.
    """
    rows = prompt_hidden_rows(output, len(input_ids))
    width = rows.shape[-1]
    h = hidden_size
    if width == h:
        raise CaptureContractError(
            f"SGLang returned rows of width {h} (= hidden size): the final hidden states only, "
            "which is what stock `return_hidden_states` gives; EAGLE3 also needs the aux layers, "
            "see pipeline/generate/sglang.py for the engine this adapter needs"
        )
    if width == 3 * h:
        raise CaptureContractError(
            f"SGLang returned rows of width {3 * h} (= 3 x hidden): the aux layers only, which "
            "is what FULL capture gives once EAGLE3 aux capture is on; the final (post-norm) "
            "hidden states are missing, see pipeline/generate/sglang.py"
        )
    if width != 4 * h:
        raise CaptureContractError(
            f"SGLang rows have width {width}, expected {4 * h} = [aux 3 x {h} | final {h}]"
        )
    rows = rows.to(dtype)
    return assemble_features(
        input_ids, loss_mask, rows[:, : 3 * h], rows[:, 3 * h :], hidden_size=h, info=info
    )


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32)
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CaptureContractError(f"SGLang hidden states are not numeric rows: {exc}") from None


# -- the backend -------------------------------------------------------------------------


class SGLangTarget(BaseTarget):
    """A target served by an in-process ``sglang.Engine`` (see the module docstring).

    ``engine``: an already started engine (or a stand-in with the same ``generate``); when
    omitted one is started with the settings capture needs, updated by ``engine_kwargs``.
    ``dtype``: the engine's dtype; ``"auto"`` reads the checkpoint's (bfloat16 if unset).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        aux_layer_ids: Sequence[int] | None = None,
        dtype: str = "auto",
        model_id: str | None = None,
        engine: SGLangEngine | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.model_path = Path(model_path).expanduser()
        config = read_text_config(self.model_path)
        try:
            self.num_layers = int(config["num_hidden_layers"])
            self.hidden_size = int(config["hidden_size"])
            self.vocab_size = int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("target.model", f"config.json lacks {exc}") from None
        self.aux_layer_ids = resolve_aux_layer_ids(aux_layer_ids, self.num_layers)
        if self.num_layers - 1 in self.aux_layer_ids:
            raise CaptureContractError(
                f"SGLang captures a layer's output at the input of the next layer, so the last "
                f"layer ({self.num_layers - 1}) cannot be an aux layer; pick earlier layers"
            )
        if dtype == "auto":
            declared = config.get("dtype") or config.get("torch_dtype")
            dtype = declared if declared in ("bfloat16", "float16") else "bfloat16"
        if dtype not in _DTYPES:
            raise ConfigError("target.dtype", f"unknown dtype {dtype!r}", f"one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[dtype]
        self._engine = engine if engine is not None else _start_engine(self.model_path, dtype, engine_kwargs)
        self._owns_engine = engine is None
        self._info = TargetInfo(
            model_id=model_id or self.model_path.resolve().name,
            revision=weights_fingerprint(self.model_path),
            num_layers=self.num_layers,
            aux_layer_ids=self.aux_layer_ids,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            dtype=dtype_name(self.dtype),
        )

    @property
    def info(self) -> TargetInfo:
        return self._info

    def capture(self, prompts: Sequence[PromptTokens]) -> list[Capture]:
        self._check_open()
        items = normalize_prompts(prompts, self.vocab_size)
        if not items:
            return []
        outputs = self._engine.generate(
            input_ids=[ids for ids, _ in items],
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            return_hidden_states=True,
        )
        if isinstance(outputs, Mapping):
            outputs = [outputs]
        outputs = list(outputs)
        if len(outputs) != len(items):
            raise CaptureContractError(f"SGLang answered {len(outputs)} results for {len(items)} prompts")
        return [
            features_from_sglang_output(
                out, ids, mask, hidden_size=self.hidden_size, dtype=self.dtype, info=self._info
            )
            for out, (ids, mask) in zip(outputs, items, strict=True)
        ]

    def _release(self) -> None:
        if self._owns_engine and hasattr(self._engine, "shutdown"):
            self._engine.shutdown()


def _start_engine(model_path: Path, dtype: str, engine_kwargs: Mapping[str, Any]) -> Any:
    try:
        import sglang  # lazy: sglang is optional (a GPU extra)
    except ImportError as exc:
        raise ConfigError(
            "target.backend",
            f"the sglang backend needs the optional `sglang` package ({exc})",
            INSTALL_HINT,
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError("target.backend", "the sglang backend needs a CUDA GPU", "use backend hf")
    kwargs: dict[str, Any] = {
        "model_path": str(model_path),
        "dtype": dtype,
        "skip_tokenizer_init": True,  # we send token ids
        "enable_return_hidden_states": True,
        "disable_radix_cache": True,  # a prefix hit would drop prompt rows
        "chunked_prefill_size": -1,  # chunking would too
        "random_seed": 0,
        "log_level": "error",
    }
    kwargs.update(engine_kwargs)
    logger.info("starting sglang.Engine(%s)", kwargs)
    return sglang.Engine(**kwargs)
