"""Each package depends only downward: a lower layer never imports a higher one.

Ranks: ``common`` 0 < ``data_pipeline`` 1 < ``model`` 2 and ``db`` 2 (which may not import each
other) < ``service`` 3 < ``app`` 4 and ``scripts`` 4 (``app`` may not import ``scripts``). Every
import statement is checked, including those inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RANKS = {
    "common": 0,
    "data_pipeline": 1,
    "model": 2,
    "db": 2,
    "service": 3,
    "app": 4,
    "scripts": 4,
}
#: Same-rank packages that must not import each other.
FORBIDDEN_SIDEWAYS = {("model", "db"), ("db", "model"), ("app", "scripts"), ("scripts", "app")}


def imported_packages(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def layering_violations(root: Path) -> list[str]:
    """``path:line: a imports b`` for every import that goes up (or sideways where forbidden)."""
    problems = []
    for package, rank in RANKS.items():
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, target in imported_packages(tree):
                if target not in RANKS or target == package:
                    continue
                if RANKS[target] > rank or (package, target) in FORBIDDEN_SIDEWAYS:
                    rel = path.relative_to(root)
                    problems.append(
                        f"{rel}:{line}: {package} (layer {rank}) imports {target} "
                        f"(layer {RANKS[target]})"
                    )
    return problems


def test_every_package_exists():
    for package in RANKS:
        assert (REPO / package / "__init__.py").is_file(), package


def test_no_package_imports_a_higher_layer():
    assert layering_violations(REPO) == []


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        (
            "db",
            "def f():\n    from model.predictor import Predictor\n",
            "db (layer 2) imports model",
        ),
        ("model", "import db.session\n", "model (layer 2) imports db"),
        ("data_pipeline", "from service import render\n", "imports service (layer 3)"),
        ("common", "import app.views as v\n", "common (layer 0) imports app (layer 4)"),
        ("app", "from scripts.predict import main\n", "app (layer 4) imports scripts"),
        (
            "service",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import app\n",
            "service (layer 3) imports app",
        ),
    ],
)
def test_checker_catches_a_planted_upward_import(tmp_path, package, source, expected):
    for name in RANKS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "planted.py").write_text(source)
    (problem,) = layering_violations(tmp_path)
    assert problem.startswith(f"{package}/planted.py:") and expected in problem


def test_checker_allows_downward_and_third_party_imports(tmp_path):
    for name in RANKS:
        (tmp_path / name).mkdir()
    (tmp_path / "service" / "ok.py").write_text(
        "import numpy\nfrom db.session import Database\nfrom model import predictor\n"
        "from common.errors import DermError\nfrom . import render\n"
    )
    assert layering_violations(tmp_path) == []
