"""The house's import rules (issue 8, DESIGN 5): what each layer loads, and which way imports run.

- What a module *loads* is checked in a fresh interpreter (``sys.modules`` after the import):
  the training loop loads neither kafka-python, nor the generators, nor any transport, stream,
  ledger or storage module, nor the plotting code; ``pipeline.core`` loads neither kafka-python
  nor torch.
- What a module *imports* is checked on its source (every import statement, module- and
  function-level, ``TYPE_CHECKING`` blocks included): no import runs upward or sideways between
  areas of one level, and only ``pipeline/transport/kafka.py`` imports kafka-python.
- A function-level import needs a reason on its own line, ``# lazy: <reason>``, and only two
  reasons count: an optional dependency (:data:`OPTIONAL`) or start-up time (a reason that starts
  with ``start-up``).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

#: Each area of the package and its level: an area imports only itself and lower levels.
LEVELS = {
    "core": 0,
    "durable_write": 0.5,  # a file written whole and durable: under storage, imports nothing of ours
    "transport": 1,
    "storage": 1,
    "feature_codec": 1,
    "read_into": 1.5,  # reads storage's files into the stream's batch buffers: above storage, below stream
    "ledger": 2,
    "vocab": 2,
    "stream": 2,
    "source": 3,
    "generate": 3,
    "train": 3,
    "devkit": 4,
    "app": 5,
}
#: Optional dependencies: the only third-party modules a function may import lazily.
OPTIONAL = {"transformers", "accelerate", "sglang", "s3fs", "gcsfs", "matplotlib", "tensorboard", "wandb"}
KAFKA_IMPORTER = "pipeline/transport/kafka.py"
#: The train modules that wire the loop to the live run (stream, ledger, storage, transport).
TRAIN_WIRING = {"pipeline.train.runner", "pipeline.train.__main__"}
#: What the training loop must never load.
LOOP_FORBIDDEN = (
    "kafka",
    "pipeline.transport",
    "pipeline.generate",
    "pipeline.source",
    "pipeline.stream",
    "pipeline.ledger",
    "pipeline.storage",
    "pipeline.app",
    "pipeline.devkit",
)
_LAZY = re.compile(r"#\s*lazy:\s*(?P<reason>\S.*)$")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(prefix: str) -> list[str]:
    return sorted(
        name
        for name in (_module_name(p) for p in PACKAGE.rglob("*.py"))
        if name == prefix or name.startswith(prefix + ".")
    )


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def _loaded_after(imports: list[str], *, then: list[str] | None = None) -> list[list[str]]:
    """``sys.modules`` after importing ``imports`` in a fresh interpreter (then after ``then``)."""
    steps = [imports] + ([then] if then is not None else [])
    script = (
        "import importlib, json, sys\n"
        "out = []\n"
        f"for step in {steps!r}:\n"
        "    for name in step:\n"
        "        importlib.import_module(name)\n"
        "    out.append(sorted(sys.modules))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _hits(loaded: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))


# --- what a module loads ---------------------------------------------------------------------


def test_the_training_loop_loads_no_kafka_no_generators_and_no_plotting() -> None:
    loop = [m for m in _modules("pipeline.train") if m not in TRAIN_WIRING]
    assert "pipeline.train.trainer" in loop
    after_trainer, after_all = _loaded_after(["pipeline.train.trainer"], then=loop)
    assert _hits(after_trainer, ("matplotlib", "pipeline.train.plot")) == [], (
        "import pipeline.train.trainer must not load the plotting code"
    )
    assert _hits(after_all, LOOP_FORBIDDEN) == [], f"the train loop modules {loop} load these"


def test_core_loads_neither_kafka_nor_torch_nor_anything_above_it() -> None:
    core = _modules("pipeline.core")
    (loaded,) = _loaded_after(core)
    assert _hits(loaded, ("kafka", "torch")) == []
    assert [m for m in loaded if m.startswith("pipeline.") and not m.startswith("pipeline.core")] == []


# --- what a module imports -------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository root
    line: int
    module: str  # the imported module, absolute
    lazy: bool  # inside a function
    comment: str  # the source line's text after '#', if any


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path, source: str | None = None) -> Iterator[Import]:
    """Every import in a module of the package (``source``: its text, when not read from disk)."""
    source = path.read_text(encoding="utf-8") if source is None else source
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pipeline.app import config`` imports the module pipeline.app.config
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        if not names:
            continue
        line = lines[node.lineno - 1]
        comment = "#" + line.partition("#")[2] if "#" in line else ""
        for name in dict.fromkeys(names):
            yield Import(str(path.relative_to(ROOT)), node.lineno, name, id(node) in in_function, comment)


def _all_imports() -> list[Import]:
    return [i for p in sorted(PACKAGE.rglob("*.py")) for i in _imports(p)]


def test_every_area_of_the_package_has_a_level() -> None:
    areas = {_area(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {None}
    assert areas <= set(LEVELS), f"areas without a level: {sorted(areas - set(LEVELS))}"


def test_no_import_runs_upward_or_sideways() -> None:
    wrong = []
    for imp in _all_imports():
        source, target = _area(_module_name(ROOT / imp.path)), _area(imp.module)
        if source is None or target is None or source == target:
            continue
        if LEVELS[target] >= LEVELS[source]:
            wrong.append(f"{imp.path}:{imp.line}: {source} (level {LEVELS[source]}) imports {imp.module} "
                         f"(level {LEVELS[target]})")
    assert wrong == [], "\n".join(wrong)


def test_only_the_kafka_transport_imports_kafka_python() -> None:
    wrong = [
        f"{imp.path}:{imp.line}: {imp.module}"
        for imp in _all_imports()
        if imp.module.split(".")[0] == "kafka" and imp.path != KAFKA_IMPORTER
    ]
    assert wrong == [], "\n".join(wrong)


def _unexplained_lazy_imports(include_app: bool) -> list[str]:
    wrong = []
    for imp in _all_imports():
        if not imp.lazy or (_area(_module_name(ROOT / imp.path)) == "app") != include_app:
            continue
        match = _LAZY.search(imp.comment)
        if match is None:
            wrong.append(f"{imp.path}:{imp.line}: {imp.module} is imported in a function without '# lazy: <reason>'")
        elif imp.module.split(".")[0] not in OPTIONAL and not match["reason"].startswith("start-up"):
            wrong.append(
                f"{imp.path}:{imp.line}: {imp.module} is neither optional ({', '.join(sorted(OPTIONAL))}) "
                f"nor imported late for start-up time ('# lazy: start-up, ...'); import it at module level"
            )
    return wrong


def test_function_level_imports_are_lazy_for_a_reason() -> None:
    wrong = _unexplained_lazy_imports(include_app=False)
    assert wrong == [], "\n".join(wrong)


def test_function_level_imports_are_lazy_for_a_reason_in_app() -> None:
    wrong = _unexplained_lazy_imports(include_app=True)
    assert wrong == [], "\n".join(wrong)


def test_the_rules_see_function_level_and_type_checking_imports() -> None:
    """The scanner itself: a TYPE_CHECKING block, function-level imports and their comments."""
    probe = {
        i.module: i
        for i in _imports(
            PACKAGE / "train" / "probe.py",
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from pipeline.app import config\n"
            "def f():\n"
            "    import transformers  # lazy: transformers is optional\n"
            "    from pipeline.stream import SampleStream\n"
            "    from . import trainer\n",
        )
    }
    assert not probe["pipeline.app.config"].lazy and not probe["typing"].lazy
    assert probe["transformers"].lazy and _LAZY.search(probe["transformers"].comment)
    assert probe["pipeline.stream"].lazy and not _LAZY.search(probe["pipeline.stream"].comment)
    assert probe["pipeline.train.trainer"].lazy
