"""The import rules of the layers, read from the source with ast (nothing is imported to check them):

    qtm.commands, qtm.cli        the shell: may import everything
    qtm (the rest), chain, fitting   the libraries: never the shell
    qtmio                        the leaf: imports none of the project's packages, nor torch or JAX

verification/ (the coverage studies, not installed) may import the libraries; no library imports it.
chain imports nothing from qtm or fitting; fitting nothing from chain; qtm's library part nothing from chain
or fitting. qtm's library part and fitting never import torch at module level (`qtm simulate` and `qtm fit`
start without it), and qtmio never imports torch or JAX at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL = ("qtm.commands", "qtm.cli", "qtm.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of a file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, top))
                found.extend((f"{base}.{alias.name}", top) for alias in child.names)
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _is_shell(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in SHELL)


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


LIBRARY_FILES = [p for pkg in ("qtm", "chain", "fitting", "qtmio") for p in _files(pkg)
                 if not _is_shell(_module_name(p))]


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_libraries_follow_the_layers(path):
    name = _module_name(path)
    problems = []
    for module, top in _imports(path):
        if _is_shell(module):
            problems.append(f"imports the shell ({module})")
        if _under(module, "verification"):
            problems.append(f"imports the verification tier ({module}), which is not installed")
        if _under(name, "chain") and _under(module, "qtm", "fitting"):
            problems.append(f"chain imports {module}")
        if _under(name, "fitting") and _under(module, "chain"):
            problems.append(f"fitting imports {module}")
        if _under(name, "qtm") and _under(module, "chain", "fitting"):
            problems.append(f"qtm's library imports {module}")
        if _under(name, "qtmio") and _under(module, "qtm", "chain", "fitting", "torch", "jax", "jaxlib"):
            problems.append(f"the I/O leaf imports {module}")
        if _under(name, "qtm", "fitting") and top and _under(module, "torch"):
            problems.append(f"imports torch at module level ({module})")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(sorted(set(problems)))


def test_the_rules_see_what_they_should():
    """The scan itself: a violation of each kind is reported (against a scratch file, not the tree)."""
    import tempfile

    source = "import torch\nfrom qtm.commands.common import fail\ndef f():\n    from fitting import driver\n"
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        path = Path(tmp) / "m.py"
        path.write_text(source)
        found = _imports(path)
    assert ("torch", True) in found and ("qtm.commands.common.fail", True) in found
    assert ("fitting.driver", False) in found


def test_packages_resolve_to_the_repository_not_to_tests():
    """tests/qtm, tests/chain, tests/fitting are packages of `tests` (each has __init__.py), so the names
    qtm, chain, fitting and qtmio always mean the project's packages."""
    import chain
    import fitting
    import qtm
    import qtmio

    for module in (qtm, chain, fitting, qtmio):
        assert Path(module.__file__).resolve().parent == ROOT / module.__name__
    for folder in ("", "qtm", "chain", "chain/toy", "fitting", "commands", "qtmio", "benchmarks", "verification"):
        assert (ROOT / "tests" / folder / "__init__.py").is_file()


def test_verification_is_not_installed_and_uses_no_shell():
    """verification/ is a top-level folder run from a checkout (`python -m verification`): pyproject's
    package list leaves it out, and it reaches the fit through the libraries, not through the shell."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(pattern.startswith("verification") for pattern in include)
    for path in _files("verification"):
        shell = [module for module, _ in _imports(path) if _is_shell(module)]
        assert not shell, f"{path.relative_to(ROOT)} imports the shell: {shell}"
