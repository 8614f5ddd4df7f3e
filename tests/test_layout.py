"""The layout's rules, checked on the source tree: no module uses another module's private names,
and no module of the execution layer (flows/) grows past ~400 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "stages", "schemas", "storage")  # stepforge.<name> is ROOT/<name>
MAX_FLOW_LINES = 400


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["stepforge", *parts])


def is_module(name: str) -> bool:
    """Whether ``name`` (``stepforge.<package>...``) is one of the project's modules or packages."""
    parts = name.split(".")
    if parts[0] != "stepforge" or len(parts) < 2 or parts[1] not in PACKAGES:
        return False
    base = ROOT.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(module: str | None, level: int, own: str, is_package: bool) -> str:
    """The absolute name of an import's module (relative imports resolved against ``own``)."""
    if level == 0:
        return module or ""
    base = own.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join([*base, module] if module else base)


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (head := dotted(node.value)) is not None:
        return f"{head}.{node.attr}"
    return None


def private_uses(path: Path) -> list[str]:
    """Each use in ``path`` of a private name of another project module: ``from X import _n`` or ``X._n``."""
    own = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: dict[str, str] = {}  # local name -> the project module it is bound to
    found: list[tuple[int, int, str]] = []
    where = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node.module, node.level, own, is_package)
            if not source.startswith("stepforge.") or source == own:
                continue
            for alias in node.names:
                if private(alias.name):
                    found.append((node.lineno, node.col_offset, f"{where}:{node.lineno}: from {source} import {alias.name}"))
                elif is_module(f"{source}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and private(node.attr)):
            continue
        chain = dotted(node.value)
        if chain is None:
            continue
        head, _, rest = chain.partition(".")
        if head not in modules:
            continue
        target = ".".join(filter(None, [modules[head], rest]))
        if target != own and is_module(target):
            use = f"{where}:{node.lineno}: {chain}.{node.attr} (private name of {target})"
            found.append((node.lineno, node.col_offset, use))
    return [use for *_, use in sorted(found)]


def test_the_scan_finds_private_imports_and_attribute_uses(tmp_path, monkeypatch) -> None:
    package = tmp_path / "stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("_x = 1\n")
    (package / "b.py").write_text(
        "from stepforge.stages.a import _x\n"
        "from stepforge.stages import a\n"
        "import stepforge.stages.a as alias\n"
        "from . import a as rel\n"
        "y = a._x + alias._x + rel._x + a.__name__\n"
        "class C:\n    _own = 1\n    def f(self):\n        return self._own\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    uses = private_uses(package / "b.py")
    assert [u.split(": ", 1)[1] for u in uses] == [
        "from stepforge.stages.a import _x",
        "a._x (private name of stepforge.stages.a)",
        "alias._x (private name of stepforge.stages.a)",
        "rel._x (private name of stepforge.stages.a)",
    ]


def test_no_module_uses_another_modules_private_names() -> None:
    offenders = [use for path in sources(*PACKAGES) for use in private_uses(path)]
    assert not offenders, "private names used across modules (make them public or move them):\n" + "\n".join(offenders)


@pytest.mark.parametrize("path", sources("flows"), ids=lambda p: str(p.relative_to(ROOT)))
def test_flow_modules_stay_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FLOW_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_FLOW_LINES}): split it"
