"""The layout of the tests themselves: no test module imports another; what several share lives in
tests/helpers/."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def is_test_module(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_")


def imported_test_modules(path: Path, package: str = "tests") -> list[str]:
    """The tests.test_* modules the file at ``path`` (in ``package``) imports, at the top or inside a function,
    absolutely or relatively, in the order written."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            if is_test_module(base):  # from tests.test_x import y
                found.append(base)
            else:  # from tests import test_x
                found += [f"{base}.{alias.name}" for alias in node.names if is_test_module(f"{base}.{alias.name}")]
    return found


def test_no_test_module_imports_another():
    files = [*TESTS.glob("test_*.py"), TESTS / "conftest.py", *TESTS.glob("helpers/*.py")]
    assert len(files) > 30  # the glob found the suite
    offenders = {}
    for path in sorted(files):
        package = ".".join(path.relative_to(TESTS.parent).parent.parts)
        if modules := imported_test_modules(path, package):
            offenders[str(path.relative_to(TESTS.parent))] = modules
    assert not offenders, f"tests import other test modules; move what they share into tests/helpers/: {offenders}"


def test_the_check_sees_every_form_of_import(tmp_path):
    source = tmp_path / "test_example.py"
    source.write_text(
        "import os\nimport tests.test_cli\nfrom tests.helpers.runs import train\n"
        "from tests import test_trainer, helpers\nfrom . import conftest\n"
        "def f():\n    from tests.test_resume import records\n    from .test_mnist import MNIST\n"
    )
    assert sorted(imported_test_modules(source)) == [
        "tests.test_cli",
        "tests.test_mnist",
        "tests.test_resume",
        "tests.test_trainer",
    ]
    helper = tmp_path / "helper.py"
    helper.write_text("from ..test_cli import ROOT\nfrom .runs import train\nfrom .. import test_faults\n")
    assert sorted(imported_test_modules(helper, "tests.helpers")) == ["tests.test_cli", "tests.test_faults"]
