"""stpm-eval: metrics on a category's test set, and the report a person reads."""

from __future__ import annotations

import json

import pytest

from stpm.cli import eval_main
from stpm.evaluation import evaluate


def test_evaluate_finds_the_synthetic_defects(trained, category):
    model, _ = trained
    evaluation = evaluate(model, category)
    results = evaluation.metrics
    assert results["images"] == {"good": 3, "defective": 3}
    assert results["image_auroc"] == 1.0 and results["f1_max"] == 1.0
    assert results["pixel_auroc"] > 0.9 and 0.5 < results["pro"] <= 1.0
    assert results["per_defect"]["scratch"]["image_auroc"] == 1.0
    assert evaluation.maps.shape == (6, 64, 64)


def test_eval_command_writes_metrics_and_report(trained, category, tmp_path, capsys):
    _, run_dir = trained
    out = tmp_path / "evaluation"
    argv = ["--model", str(run_dir / "model.pt"), "--data", str(category), "--out", str(out)]
    assert eval_main(argv) == 0
    results = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_max"):
        assert 0.0 <= results[key] <= 1.0 and key in results["per_defect"]["scratch"]
    for picture in ("roc.png", "histogram.png", "heatmaps.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
        assert f"({picture})" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "scratch" in printed and "all" in printed


@pytest.mark.parametrize("folder", ["missing", "no_test"])
def test_eval_command_names_the_problem(trained, tmp_path, capsys, folder):
    _, run_dir = trained
    target = tmp_path / folder
    if folder == "no_test":
        target.mkdir()
    assert eval_main(["--model", str(run_dir / "model.pt"), "--data", str(target)]) == 2
    assert str(target) in capsys.readouterr().err
