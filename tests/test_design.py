"""The package's shape: no import cycles, scikit-learn's estimator conventions, no global side
effects on the caller, and a README whose library example runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

import stpm
from stpm import STPM

from .conftest import make_category

PACKAGE = Path(stpm.__file__).resolve().parent
README = PACKAGE.parent / "README.md"


def package_imports() -> dict[str, set[str]]:
    """module -> the stpm modules it imports, anywhere in the file (inside functions too)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imported.add(node.module.split(".")[0])
                else:
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stpm"):
                parts = node.module.split(".")
                imported.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("stpm."):
                        imported.add(alias.name.split(".")[1])
        graph[name] = imported - {name}
    return graph


def test_no_import_cycle_inside_the_package():
    graph = package_imports()
    assert "export" in graph and "detector" in graph
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done or module not in graph:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_exporter_and_the_runtimes_do_not_know_the_estimator():
    graph = package_imports()
    for module in ("export", "runtime", "model", "networks", "modelfile"):
        assert "detector" not in graph[module], module


def test_the_process_group_knows_nothing_of_the_method():
    """stpm.distributed is plumbing: training, scoring and evaluation call it, never the reverse."""
    assert package_imports()["distributed"] <= {"errors"}


def test_clone_gives_an_equal_unfitted_estimator(trained):
    original = STPM(epochs=3, strides=[8, 16], threads=1)
    copy = clone(original)
    assert copy is not original and copy.get_params() == original.get_params()
    assert copy.strides == [8, 16]  # stored as given, not converted
    assert not hasattr(copy, "runtime_") and not hasattr(copy, "threshold_")
    fitted, _ = trained
    unfitted = clone(fitted)
    assert unfitted.get_params() == fitted.get_params() and not hasattr(unfitted, "runtime_")


def test_set_params_and_every_argument_is_an_attribute():
    model = STPM().set_params(epochs=7, combine="sum")
    assert model.epochs == 7 and model.combine == "sum"
    for name, value in STPM().get_params().items():
        assert getattr(STPM(), name) == value
    with pytest.raises(ValueError):
        model.set_params(no_such_setting=1)


def test_import_and_work_leave_the_matplotlib_backend_alone(tmp_path):
    """A caller's backend (a notebook's, a GUI's) is not switched to Agg behind its back."""
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import stpm, stpm.cli, stpm.evaluation, stpm.visualize as v; "
        f"v.roc_curves({{'x': ([0, 1], [0, 1], 0.5)}}, {str(tmp_path / 'roc.png')!r}); "
        "print(matplotlib.get_backend())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "svg"
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def readme_library_example() -> str:
    section = README.read_text().split("## Library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_library_example_runs(tmp_path, monkeypatch):
    """The code block under "## Library" in README.md, as written, on a tiny category."""
    monkeypatch.chdir(tmp_path)
    category = make_category(tmp_path / "data" / "magnetic_tile", train=20)
    test_images = sorted((category / "test").rglob("*.png"))
    for name, source in (("a.png", test_images[0]), ("b.png", test_images[-1])):
        (tmp_path / name).write_bytes(source.read_bytes())
    namespace: dict = {}
    exec(compile(readme_library_example(), "README.md", "exec"), namespace)
    model = namespace["model"]
    assert (tmp_path / "runs" / "tiles" / "model.pt").is_file()
    assert isinstance(model.threshold_, float) and np.isfinite(model.threshold_)
