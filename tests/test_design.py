"""The package's shape: short functions, a thin estimator, one place for the score's rule, no
import cycles, scikit-learn's estimator conventions, no torch where only an export is scored,
no global side effects on the caller, and a README whose library example runs."""

from __future__ import annotations

import ast
import json
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
SCRIPTS = PACKAGE.parent / "scripts"
MAX_FUNCTION_LINES = 80
MAX_ESTIMATOR_LINES = 250
# where an image term may be added to a map maximum: the scoring module, and the ONNX graph's
# own score output, its documented twin in torch (stpm.model.AnomalyMapModel)
SCORE_RULE = {PACKAGE / "scoring.py", PACKAGE / "model.py"}
# where the estimator's fitted attributes (name_) may be set: its own methods that fit, load,
# set_map and set_threshold, and the two helpers they share
FITTED_BY = {"fit", "load", "set_map", "set_threshold", "_adopt", "_calibrate"}


def parsed(folder: Path) -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted(folder.rglob("*.py"))}


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in parsed(PACKAGE).items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_the_estimator_is_a_thin_front():
    (estimator,) = [
        node
        for node in parsed(PACKAGE)[PACKAGE / "detector.py"].body
        if isinstance(node, ast.ClassDef) and node.name == "STPM"
    ]
    assert estimator.end_lineno - estimator.lineno + 1 <= MAX_ESTIMATOR_LINES


def test_only_the_scoring_module_adds_an_image_term_to_a_map_maximum():
    """The rule, mechanically: an addition (a + b, a += b) with one operand whose code names a
    term ("term") and the other a maximum or a score ("max", "score") is the image score being
    computed. It may stand in stpm/scoring.py and the graph's twin alone; scripts/ count too."""

    def names(node: ast.AST, *words: str) -> bool:
        return any(word in ast.unparse(node).lower() for word in words)

    found = []
    for path, tree in {**parsed(PACKAGE), **parsed(SCRIPTS)}.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                pair = (node.left, node.right)
            elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
                pair = (node.target, node.value)
            else:
                continue
            for one, other in (pair, pair[::-1]):
                if names(one, "term") and names(other, "max", "score") and path not in SCORE_RULE:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, f"the image score computed outside stpm.scoring: {found}"
    # and the rule is found where it belongs (the test would pass on nothing otherwise)
    assert "map_maxima(maps) + " in (PACKAGE / "scoring.py").read_text()


def test_only_the_estimator_sets_its_fitted_attributes():
    """learned_ attributes are set by fit, load, set_map and set_threshold (and the helpers
    they share), never from outside: other modules hand what they made to fit (e.g. init)."""
    found = []
    for path, tree in {**parsed(PACKAGE), **parsed(SCRIPTS)}.items():
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for target in (t for t in targets for t in ast.walk(t)):
                    if not isinstance(target, ast.Attribute) or not target.attr.endswith("_"):
                        continue
                    if target.attr.startswith("__") or not isinstance(target.ctx, ast.Store):
                        continue
                    inside = path == PACKAGE / "detector.py" and function.name in FITTED_BY
                    if not inside:
                        found.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    assert not found, found


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


def test_scoring_an_export_loads_neither_torch_nor_timm(onnx_file, category, tmp_path):
    """stpm-predict and STPM.load on an exported file, ONNX Runtime and OpenVINO: torch and timm
    (a second and 500 MB of a line PC's start-up) stay out of the process; so does scikit-learn
    (another second)."""
    image = sorted((category / "test" / "scratch").iterdir())[0]
    code = (
        "import sys; from stpm import STPM; from stpm.cli import predict_main\n"
        "for runtime in ('onnxruntime', 'openvino'):\n"
        f"    argv = [{str(image)!r}, '--model', {str(onnx_file)!r}, '--runtime', runtime]\n"
        f"    assert predict_main([*argv, '--out', {str(tmp_path)!r}]) == 0\n"
        f"    STPM.load({str(onnx_file)!r}, runtime=runtime).predict({str(image)!r})\n"
        "print(sorted({'torch', 'timm', 'sklearn'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


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


def readme_library_examples() -> list[str]:
    """The python code blocks of README.md's "## Library" section, in order. (The Ray blocks
    further down need a Ray cluster and MVTec AD: tests/test_raydata.py runs their calls.)"""
    section = README.read_text().split("## Library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readme_library_examples_run(tmp_path, monkeypatch):
    """Every code block under "## Library" in README.md, as written, one after another in one
    namespace, on a tiny category; the names they use are reachable as they import them."""
    monkeypatch.chdir(tmp_path)
    category = make_category(tmp_path / "data" / "magnetic_tile", train=20)
    test_images = sorted((category / "test").rglob("*.png"))
    for name, source in (("a.png", test_images[0]), ("b.png", test_images[-1])):
        (tmp_path / name).write_bytes(source.read_bytes())
    blocks = readme_library_examples()
    assert len(blocks) >= 2 and "score_files" in blocks[1]
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md, Library block {number}", "exec"), namespace)
    model = namespace["model"]
    assert (tmp_path / "runs" / "tiles" / "model.pt").is_file()
    assert isinstance(model.threshold_, float) and np.isfinite(model.threshold_)
    summary = json.loads((tmp_path / "predictions" / "summary.json").read_text())
    rows = namespace["scored"].rows
    assert summary["images"] == len(rows) == 2 and isinstance(rows[0]["score"], float)
    assert summary["model"] == "runs/tiles/model.pt"
    assert (tmp_path / "runs" / "tiles" / "model.onnx").is_file()
