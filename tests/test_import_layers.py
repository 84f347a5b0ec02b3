"""The package's imports run one way, downward: data and eval import nothing above them, and MiniWorld is
imported only by the package face and the commands that make its data (it registers its source type and suites).

Imports are read from the source with ``ast`` (nothing is executed): every ``import`` and ``from … import``,
at module level or inside a function, and every module named by a string given to ``importlib.import_module``
or ``__import__``.
"""

from __future__ import annotations

import ast
import os

import pytest

import mmbridge

PACKAGE = os.path.dirname(mmbridge.__file__)
ROOT = os.path.dirname(PACKAGE)
# who may import the world: the package face (so that importing mmbridge registers it) and the commands that write
# or demonstrate its data
WORLD_IMPORTERS = ("mmbridge/__init__.py", "mmbridge/cli.py", "mmbridge/demo.py")
ABOVE = {  # a package → what it must never import
    "mmbridge/data/": ("mmbridge.model", "mmbridge.generate", "mmbridge.eval", "mmbridge.worlds", "mmbridge.train",
                       "mmbridge.serve", "mmbridge.interop", "mmbridge.cli", "mmbridge.demo"),
    "mmbridge/eval/": ("mmbridge.worlds", "mmbridge.train", "mmbridge.serve", "mmbridge.interop", "mmbridge.cli",
                       "mmbridge.demo"),
}


def package_files() -> list[str]:
    """Every ``.py`` file of the package, as a path from the repository root with ``/`` separators."""
    paths = []
    for directory, _, names in os.walk(PACKAGE):
        paths += [os.path.relpath(os.path.join(directory, name), ROOT).replace(os.sep, "/")
                  for name in names if name.endswith(".py")]
    return sorted(paths)


def imported_modules(path: str, root: str = ROOT) -> set[str]:
    """The modules ``path`` imports: statements anywhere in the file, and string arguments of
    ``importlib.import_module`` / ``__import__`` calls. Relative imports are resolved against the file's package."""
    with open(os.path.join(root, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    package = path[:-len(".py")].replace("/", ".").split(".")[:-1]
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            modules.update([base] + [f"{base}.{alias.name}" for alias in node.names])
        elif isinstance(node, ast.Call) and _names_an_import(node.func) and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                modules.add(node.args[0].value)
    return modules


def _names_an_import(function: ast.expr) -> bool:
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    return name in ("import_module", "__import__")


def _hits(path: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(module for module in imported_modules(path)
                  if any(module == prefix or module.startswith(prefix + ".") for prefix in forbidden))


def test_the_reader_sees_every_kind_of_import(tmp_path) -> None:
    source = ("import mmbridge.a\nfrom mmbridge.b import c\nfrom . import d\n"
              "def f():\n    from mmbridge.e import g\n    importlib.import_module('mmbridge.h')\n")
    (tmp_path / "mmbridge" / "x").mkdir(parents=True)
    (tmp_path / "mmbridge" / "x" / "y.py").write_text(source)
    assert imported_modules("mmbridge/x/y.py", str(tmp_path)) >= {"mmbridge.a", "mmbridge.b", "mmbridge.x.d", "mmbridge.e",
                                                   "mmbridge.h"}


def test_nothing_below_the_world_imports_it() -> None:
    importers = {path for path in package_files() if not path.startswith("mmbridge/worlds/")
                 and _hits(path, ("mmbridge.worlds",))}
    assert "mmbridge/__init__.py" in importers and importers <= set(WORLD_IMPORTERS)


@pytest.mark.parametrize("folder", sorted(ABOVE))
def test_a_lower_package_imports_nothing_above_it(folder: str) -> None:
    found = {path: _hits(path, ABOVE[folder]) for path in package_files() if path.startswith(folder)}
    assert found and not {path: hits for path, hits in found.items() if hits}
