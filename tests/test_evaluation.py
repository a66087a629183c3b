"""stpm-eval: metrics on a category's test set, and the report a person reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from stpm.cli import eval_main
from stpm.evaluation import _examples, evaluate, write_report

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


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
    assert results["operating_points"][0]["chosen_by"] == "the model's threshold"
    assert "the model's threshold" in printed and "false alarms" in printed


@pytest.mark.parametrize("folder", ["missing", "no_test"])
def test_eval_command_names_the_problem(trained, tmp_path, capsys, folder):
    _, run_dir = trained
    target = tmp_path / folder
    if folder == "no_test":
        target.mkdir()
    assert eval_main(["--model", str(run_dir / "model.pt"), "--data", str(target)]) == 2
    assert str(target) in capsys.readouterr().err


def test_the_report_counts_and_names_what_the_threshold_does(trained, category, tmp_path):
    """True counts (each row: its defective images and every good one), the model and its rule,
    and "false alarm" only for a good part above the threshold."""
    model, run_dir = trained
    evaluation = evaluate(model, category)
    write_report(evaluation, model, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| all | 3 | 3 |" in report and "| scratch | 3 | 3 |" in report
    assert "mean + 3 * std" in report and "the map's maximum + the image term" in report
    scores, labels = evaluation.scores, evaluation.labels
    for threshold in (float(scores.max()) + 1, float(np.median(scores[labels == 0]))):
        for title, *_ in _examples(evaluation, threshold, 3):
            name = title.rsplit("\n", 1)[-1]
            index = next(
                i for i, s in enumerate(evaluation.samples) if name == f"{s.defect}/{s.path.stem}"
            )
            alarm = labels[index] == 0 and scores[index] > threshold
            assert ("false alarm" in title) == alarm, title


def test_the_operating_points_are_those_of_scripts_operating_points(trained, category, tmp_path):
    model, _ = trained
    evaluation = evaluate(model, category)
    points = {p["chosen_by"]: p for p in evaluation.metrics["operating_points"]}
    assert points["the model's threshold"]["threshold"] == model.threshold_
    relative = [str(s.path.relative_to(category)) for s in evaluation.samples]
    np.savez(tmp_path / "maps.npz", scores=evaluation.scores, paths=np.array(relative))
    sys.path.insert(0, str(SCRIPTS))
    try:
        import operating_points
    finally:
        sys.path.remove(str(SCRIPTS))
    lines = operating_points.table({"stpm": tmp_path / "maps.npz"})
    for share, name in ((0.01, "1% of good parts rejected"), (0.05, "5% of good parts rejected")):
        row = next(line for line in lines if line.startswith(f"| stpm | {share:.0%} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")][2:]
        point = points[name]
        assert cells == [f"{point['caught']:.2f}", f"{point['caught_per_defect']['scratch']:.2f}"]
        assert point["false_alarm_rate"] <= share
