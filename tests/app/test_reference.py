"""The configuration reference is generated from RunConfig, and the README holds exactly that table."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydantic import BaseModel

from pipeline.app.config import FINGERPRINT_KEYS, RunConfig
from pipeline.app.reference import readme_reference, reference_rows, render_reference
from tests.support import specstream_command

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_key_has_a_description() -> None:
    def undocumented(model: type[BaseModel], prefix: str = "") -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(prefix + name)
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                missing += undocumented(info.annotation, f"{prefix}{name}.")
        return missing

    assert undocumented(RunConfig) == []


def test_the_table_lists_every_key_once_and_marks_the_fingerprint() -> None:
    keys = [row[0] for row in reference_rows()]
    assert len(keys) == len(set(keys)) and set(FINGERPRINT_KEYS) <= set(keys)
    table = render_reference()
    assert "| `train.lr` \\* | float | `0.0001` |" in table
    assert "| `train.device` | str \\| null | `null` |" in table
    assert "| `data.path` \\* | str | required |" in table


def test_the_readme_table_is_the_generated_one() -> None:
    assert readme_reference(README.read_text()) == render_reference(), (
        "README.md's configuration table differs from RunConfig: paste `specstream config reference` "
        "between the config-reference markers"
    )


def test_specstream_config_reference_prints_it() -> None:
    out = subprocess.run(
        [specstream_command(), "config", "reference"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out == render_reference()
