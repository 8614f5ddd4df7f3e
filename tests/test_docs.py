"""The docs stay true to the code.

- ``docs/architecture.md``'s chain picture and stage table are generated from the stage registry
  (``stepforge.flows.runtime.docs``): the page and the registry cannot disagree.
- Every repository path the docs and the README cite in backticks (``flows/synthesize.py``,
  ``stages/verify/judge.py``, ``configs/gsm8k.yaml``, ``benchmarks/labellers.py``, a module's
  attribute as ``flows/backfill.backfill_run``) exists, and so does every ``stepforge.…`` module.
- No doc cites a file the repository does not have (``DESIGN.md``).
- What the architecture page says of Prefect holds: stages, storage, schemas and the runtime never
  import it.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from stepforge.flows.runtime.docs import BEGIN, END, generated_block

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
REGENERATE = ".venv/bin/python -m stepforge.flows.runtime.docs docs/architecture.md"

# What a cited repository path starts with: a top-level folder, or is: a top-level file.
TOP_DIRS = ("flows", "stages", "schemas", "storage", "configs", "benchmarks", "tests", "docs", "docker", ".ci")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml", "prefect.yaml", "docker-compose.yml", "requirements.lock",
             ".env.example")
FILE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".jsonl", ".lock", ".toml", ".txt", ".sh", ".parquet",
                 ".html", ".Dockerfile"}
PATH = re.compile(
    r"(?<![\w./$<{-])((?:%s)/[\w./=-]*[\w/]|(?:%s))(?![\w/])"
    % ("|".join(map(re.escape, TOP_DIRS)), "|".join(map(re.escape, TOP_FILES)))
)
PATTERN_CHARS = "<*{$…"  # `configs/<name>.yaml`, `stages/*/x.py`: a pattern, not a path
MODULE = re.compile(r"^stepforge(?:\.[A-Za-z_]\w*)+$")
FENCE = re.compile(r"^\s*(```|~~~)")
SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def code_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span and every line of a fenced block."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            found.append((number, line))
        else:
            found.extend((number, m.group(2).strip()) for m in SPAN.finditer(line))
    return found


def cited_paths(text: str) -> list[tuple[int, str]]:
    """Repository paths cited in code spans and fenced blocks (patterns left out), and relative link targets."""
    cited = []
    for number, span in code_spans(text):
        for m in PATH.finditer(span):
            if span[m.end() : m.end() + 1] and span[m.end()] in PATTERN_CHARS:
                continue
            cited.append((number, m.group(1)))
    for number, line in enumerate(text.splitlines(), 1):
        cited.extend((number, m.group(1)) for m in LINK.finditer(line) if "://" not in m.group(1)
                     and not m.group(1).startswith("mailto:"))
    return cited


def resolves(path: str, base: Path) -> bool:
    """The path exists, or names a module's attribute (``flows/backfill.backfill_run``)."""
    if (base / path).exists() or (ROOT / path).exists():
        return True
    stem, _, attribute = path.rpartition(".")
    if not stem or "/" in attribute or f".{attribute}" in FILE_SUFFIXES:
        return False
    module = ROOT / f"{stem}.py"
    return module.is_file() and re.search(rf"\b{re.escape(attribute)}\b", module.read_text()) is not None


def module_resolves(name: str) -> bool:
    """``stepforge.a.b`` is a module, or a module's attribute (``stepforge.flows.runtime.docs.generated_block``)."""
    parts = name.split(".")
    for cut in range(len(parts), 1, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            continue
        obj = importlib.import_module(module_name)
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def generated_part(text: str) -> str:
    assert text.count(BEGIN) == 1 and text.count(END) == 1, (
        f"docs/architecture.md must hold the markers {BEGIN} and {END} once each; then run {REGENERATE}"
    )
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def test_the_chain_picture_and_stage_table_in_architecture_md_are_the_registrys():
    in_doc, expected = generated_part(ARCHITECTURE.read_text()), generated_block()
    if in_doc != expected:
        diff = difflib.unified_diff(in_doc.splitlines(), expected.splitlines(), "docs/architecture.md", "registry",
                                    lineterm="", n=0)
        pytest.fail(
            "docs/architecture.md's chain picture / stage table disagree with the stage registry; regenerate them "
            f"(never edit between the markers by hand):\n    {REGENERATE}\n" + "\n".join(list(diff)[:40]),
            pytrace=False,
        )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_a_doc_cites_exists(doc):
    missing = [f"{doc.relative_to(ROOT)}:{number}: {path}" for number, path in cited_paths(doc.read_text())
               if not resolves(path, doc.parent)]
    assert not missing, "these paths are cited but not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_stepforge_module_a_doc_names_exists(doc):
    names = {(n, s.rstrip("()")) for n, s in code_spans(doc.read_text()) if MODULE.match(s.rstrip("()"))}
    missing = [f"{doc.relative_to(ROOT)}:{n}: {s}" for n, s in sorted(names) if not module_resolves(s)]
    assert not missing, "these modules are named but do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_cites_a_design_document_the_repository_does_not_have(doc):
    lines = [f"{doc.relative_to(ROOT)}:{n}" for n, line in enumerate(doc.read_text().splitlines(), 1)
             if re.search(r"DESIGN(\.md|\s*§)", line)]
    assert not lines, "a doc cites DESIGN.md, which is not in the repository: " + ", ".join(lines)


def test_the_checks_above_see_what_they_should():
    """The path finder finds paths in prose spans, commands and fenced blocks, and skips patterns."""
    text = "\n".join([
        "see `flows/synthesize.py` and `benchmarks/labellers.py synthetic`, `flows/backfill.backfill_run`",
        "and `configs/<name>.yaml`, `<store>/runs/<run>.json`, `stages/*/x.py`",
        "```", "stepforge run configs/gsm8k.yaml", "```",
    ])
    assert [p for _, p in cited_paths(text)] == [
        "flows/synthesize.py", "benchmarks/labellers.py", "flows/backfill.backfill_run", "configs/gsm8k.yaml",
    ]
    assert resolves("flows/backfill.backfill_run", ROOT) and not resolves("flows/shards.py", ROOT)
    assert not resolves("flows/backfill.no_such_name", ROOT)
    assert module_resolves("stepforge.flows.runtime.docs.generated_block")
    assert not module_resolves("stepforge.stages.llm.synthetic")


PREFECT_FREE = ("stages", "storage", "schemas", "flows/runtime")


def test_stages_storage_schemas_and_the_runtime_never_import_prefect():
    """docs/architecture.md says Prefect lives in the flows only; a stage runs under any executor."""
    offenders = []
    for folder in PREFECT_FREE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n == "prefect" or n.startswith(("prefect.", "prefect_")) for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "Prefect imported outside flows/: " + ", ".join(offenders)
