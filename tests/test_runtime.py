"""Every runtime gives the torch maps; `auto` never changes silently; threads are parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stpm.scoring
from stpm import STPM, StpmError
from stpm.cli import eval_main, export_main, predict_main
from stpm.runtime import MAX_DEFAULT_THREADS, OnnxRuntime, default_threads, open_runtime

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def test_paths(category):
    return sorted((category / "test").rglob("*.png"))


def test_openvino_runs_the_onnx_file_with_the_torch_maps(trained, onnx_file, test_paths):
    model, _ = trained
    openvino = STPM.load(onnx_file, runtime="openvino", threads=1)
    assert openvino.runtime_.name == "openvino" and openvino.runtime_.precision == "f32"
    assert openvino.runtime_.threads == 1 and openvino.threshold_ == model.threshold_
    for ours, theirs in zip(model.predict(test_paths), openvino.predict(test_paths), strict=True):
        assert theirs.score == pytest.approx(ours.score, rel=1e-4, abs=1e-6)
        assert np.abs(theirs.anomaly_map - ours.anomaly_map).max() < 1e-4
        assert theirs.is_anomalous == ours.is_anomalous


def test_bf16_is_an_option_and_the_compiled_precision_is_recorded(trained, onnx_file, test_paths):
    model, _ = trained
    runtime = open_runtime(onnx_file, "openvino", precision="bf16")
    assert runtime.precision in ("bf16", "f32")  # f32 where the CPU has no BF16 arithmetic
    ours = STPM.load(onnx_file, runtime="openvino", precision="bf16").predict(test_paths)
    reference = model.predict(test_paths)
    correlation = np.corrcoef([p.score for p in ours], [p.score for p in reference])[0, 1]
    assert correlation > 0.9


def test_auto_keeps_onnx_runtime_for_onnx_files_and_torch_for_pt(trained, onnx_file):
    _, run_dir = trained
    assert STPM.load(onnx_file).runtime_.name == "onnxruntime"
    assert STPM.load(run_dir / "model.pt", device="cpu").runtime_.name == "torch"
    assert isinstance(open_runtime(onnx_file, "onnxruntime", threads=1), OnnxRuntime)


@pytest.mark.parametrize(
    "runtime, suffix, message",
    [
        ("openvino", ".pt", "runs .onnx files"),
        ("onnxruntime", ".pt", "runs .onnx files"),
        ("torch", ".onnx", "onnxruntime or openvino"),
        ("tensorrt", ".onnx", "unknown runtime"),
    ],
)
def test_a_runtime_that_cannot_run_the_file_says_so(trained, onnx_file, runtime, suffix, message):
    _, run_dir = trained
    path = onnx_file if suffix == ".onnx" else run_dir / "model.pt"
    with pytest.raises(StpmError, match=message):
        STPM.load(path, runtime=runtime)
    with pytest.raises(StpmError, match="precision"):
        STPM.load(onnx_file, runtime="openvino", precision="int4")


def test_default_threads_are_this_processes_cores_capped():
    assert 1 <= default_threads() <= MAX_DEFAULT_THREADS


def test_one_image_is_decoded_without_a_thread_pool(trained, test_paths, monkeypatch):
    model, _ = trained

    def no_pool(*args, **kwargs):
        raise AssertionError("a thread pool was created for one image")

    monkeypatch.setattr(stpm.scoring, "ThreadPoolExecutor", no_pool)
    assert len(model.predict(test_paths[0])) == 1
    with pytest.raises(AssertionError, match="thread pool"):
        model.predict(test_paths[:2])  # many images: decoded ahead in the background


def test_cli_predicts_through_openvino_with_threads(trained, onnx_file, category, tmp_path):
    out = tmp_path / "out"
    argv = [str(category / "test"), "--model", str(onnx_file), "--out", str(out)]
    assert predict_main([*argv, "--runtime", "openvino", "--threads", "1", "--no-images"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "openvino" and summary["threads"] == 1
    assert summary["images"] == 6 and summary["failed"] == 0


def test_eval_without_masks_writes_null_not_nan(trained, category, tmp_path, capsys, recwarn):
    _, run_dir = trained
    unmasked = tmp_path / "unmasked"
    unmasked.mkdir()
    for folder in ("train", "test"):
        (unmasked / folder).symlink_to(category / folder)
    out = tmp_path / "evaluation"
    argv = ["--model", str(run_dir / "model.pt"), "--data", str(unmasked), "--out", str(out)]
    assert eval_main([*argv, "--device", "cpu"]) == 0
    text = (out / "metrics.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    metrics = json.loads(text, parse_constant=refuse)
    assert metrics["pixel_auroc"] is None and metrics["pro"] is None
    assert metrics["image_auroc"] == 1.0
    assert "pixel AUROC and PRO need defect masks" in capsys.readouterr().out
    assert not [w for w in recwarn if "positive samples" in str(w.message)]


def test_export_finds_the_data_folder_in_the_runs_config(trained, tmp_path, capsys):
    _, run_dir = trained
    out = tmp_path / "model.onnx"
    assert export_main(["--model", str(run_dir / "model.pt"), "--out", str(out)]) == 0
    assert out.is_file() and "train/good images of" in capsys.readouterr().out
    lone = tmp_path / "lone" / "model.pt"
    lone.parent.mkdir()
    lone.write_bytes((run_dir / "model.pt").read_bytes())
    assert export_main(["--model", str(lone)]) == 2
    assert "--data" in capsys.readouterr().err


def test_the_false_alarm_threshold_is_the_quantile_of_the_validation_scores(trained, tmp_path):
    model, run_dir = trained
    scores = model.validation_scores_
    assert model.threshold_at(0.25) == pytest.approx(np.quantile(scores, 0.75))
    with pytest.raises(StpmError, match=r"\(0, 1\)"):
        model.threshold_at(1.5)
    strict = STPM.load(run_dir / "model.pt", device="cpu").set_threshold(max_false_alarms=0.01)
    assert strict.threshold_ == pytest.approx(np.quantile(scores, 0.99))
    assert strict.set_threshold(None).threshold_ == pytest.approx(model.threshold_)
    strict.set_threshold(0.01)
    again = STPM.load(strict.save(tmp_path / "strict.pt"), device="cpu")
    assert again.max_false_alarms == 0.01 and again.threshold_ == strict.threshold_
    assert again.describe().validation["threshold_rule"] == "quantile 0.99"


def test_cli_trains_to_a_false_alarm_share_and_reports_the_defects_caught(
    category, tmp_path, capsys
):
    from stpm.cli import train_main

    out = tmp_path / "run"
    argv = ["--data", str(category), "--out", str(out), "--image-size", "64", "--epochs", "2"]
    argv += ["--batch-size", "4", "--validation-fraction", "0.25", "--device", "cpu"]
    defects = category / "test" / "scratch"
    assert train_main([*argv, "--max-false-alarms", "0.1", "--defects", str(defects)]) == 0
    printed = capsys.readouterr().out
    assert "quantile 0.9 of the validation scores" in printed
    assert "of the 3 defective images in" in printed
    model = STPM.load(out / "model.pt", device="cpu")
    assert model.threshold_ == pytest.approx(np.quantile(model.validation_scores_, 0.9))
    assert train_main([*argv, "--max-false-alarms", "2"]) == 2
    assert "(0, 1)" in capsys.readouterr().err


def test_cli_predicts_at_a_false_alarm_share(trained, category, tmp_path, capsys):
    model, run_dir = trained
    out = tmp_path / "out"
    argv = [str(category / "test"), "--model", str(run_dir / "model.pt"), "--out", str(out)]
    assert predict_main([*argv, "--max-false-alarms", "0.5", "--no-images"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == pytest.approx(model.threshold_at(0.5))
    assert predict_main([*argv, "--max-false-alarms", "0.5", "--threshold", "1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_openvino_pads_a_partial_batch_to_a_size_it_compiled(onnx_file, test_paths):
    """A folder's last batch is padded to the batch size warmed for it: no second compilation
    (a second of a line PC's time) for a handful of images."""
    model = STPM.load(onnx_file, runtime="openvino", threads=1)
    model.runtime_.warm([4])
    predictions = model.predict(test_paths, batch_size=4)  # 6 images: 4, then 2 padded to 4
    assert sorted(model.runtime_.requests) == [1, 4]
    one_by_one = model.predict(test_paths, batch_size=1)
    np.testing.assert_allclose(
        [p.score for p in predictions], [p.score for p in one_by_one], rtol=1e-4, atol=1e-6
    )
