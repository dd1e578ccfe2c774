"""A local Hugging Face model directory's ``config.json``, read the same way by every stage.

The source sizes the draft vocabulary from it and the SGLang backend reads the layer count from
it; neither may import the other, so the reading lives here (plain JSON, no model library).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError

__all__ = ("read_text_config",)


def read_text_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a local checkpoint, the text part for multimodal ones."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("target.model", f"cannot read {path}: {exc}") from None
    text = config.get("text_config")
    return text if isinstance(text, dict) and "hidden_size" in text else config
