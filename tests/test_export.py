"""stpm-export: the ONNX graph gives the torch model's maps and scores, FP32 and INT8."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from stpm import STPM, StpmError, data
from stpm.calibration import split_validation
from stpm.cli import export_main, predict_main
from stpm.export import compare, export_model
from stpm.model import _blur_matrix
from stpm.runtime import OnnxRuntime


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, _ = trained
    _blur_matrix.cache_clear()  # the export must not depend on what ran before it
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_model(model.runtime_, path, check=False).path


def test_onnx_runtime_gives_the_torch_maps_and_verdicts(trained, exported, category):
    model, _ = trained
    runtime = STPM.load(exported)
    paths = sorted((category / "test").rglob("*.png"))
    torch_predictions, onnx_predictions = model.predict(paths), runtime.predict(paths)
    for ours, theirs in zip(torch_predictions, onnx_predictions, strict=True):
        assert theirs.score == pytest.approx(ours.score, rel=1e-4, abs=1e-6)
        assert np.abs(theirs.anomaly_map - ours.anomaly_map).max() < 1e-4
        assert theirs.is_anomalous == ours.is_anomalous
    assert runtime.threshold_ == model.threshold_ and runtime.input_size_ == model.input_size_


@pytest.mark.parametrize(("combine", "sigma"), [("product", 0.0), ("sum", 0.0), ("sum", 4.0)])
def test_each_map_option_survives_export(trained, category, tmp_path, combine, sigma):
    """(product with sigma 4, the default, is the fixture's export above.)"""
    _, run_dir = trained
    model = STPM.load(run_dir / "model.pt", device="cpu")
    validation = [Path(path) for path in _validation(run_dir)]
    model.set_map(combine, sigma, validation)
    path = export_model(model.runtime_, tmp_path / "model.onnx", check=False).path
    exported = STPM.load(path)
    assert (exported.combine, exported.smoothing_sigma) == (combine, sigma)
    images = np.random.default_rng(1).integers(0, 256, (3, *model.input_size_, 3), dtype=np.uint8)
    assert np.abs(exported.anomaly_maps(images) - model.anomaly_maps(images)).max() < 1e-4


def _validation(run_dir) -> list[str]:
    return json.loads((run_dir / "config.json").read_text())["validation_images"]


def test_batch_size_is_dynamic(trained, exported):
    model, _ = trained
    images = np.random.default_rng(0).integers(0, 256, (5, *model.input_size_, 3), dtype=np.uint8)
    # batches of 2, 2 and 1 through one graph
    check = compare(model.runtime_, OnnxRuntime(exported), images, 2)
    assert check["images"] == 5 and check["max_abs_map_difference"] < 1e-4


def test_cli_exports_and_predicts_through_onnx(trained, category, tmp_path, capsys):
    _, run_dir = trained
    out = tmp_path / "model.onnx"
    argv = ["--model", str(run_dir / "model.pt"), "--data", str(category), "--out", str(out)]
    assert export_main(argv) == 0
    assert "max |map difference|" in capsys.readouterr().out
    results = {}
    for model_file in (run_dir / "model.pt", out):
        folder = tmp_path / model_file.suffix[1:]
        argv = [str(category / "test"), "--model", str(model_file), "--out", str(folder)]
        assert predict_main([*argv, "--device", "cpu"]) == 0
        with open(folder / "predictions.csv", encoding="utf-8") as handle:
            results[model_file.suffix] = {row["path"]: row for row in csv.DictReader(handle)}
    assert results[".pt"].keys() == results[".onnx"].keys()
    for path, row in results[".pt"].items():
        assert float(results[".onnx"][path]["score"]) == pytest.approx(float(row["score"]), 1e-4)
        assert results[".onnx"][path]["verdict"] == row["verdict"]


def test_int8_export_quantises_convolutions_and_keeps_the_map_fp32(trained, category, tmp_path):
    _, run_dir = trained
    out = tmp_path / "int8.onnx"
    argv = ["--model", str(run_dir / "model.pt"), "--data", str(category), "--out", str(out)]
    assert export_main([*argv, "--int8"]) == 0
    graph = onnx.load(str(out)).graph
    operators = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators
    quantized_inputs = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    for node in graph.node:  # the map arithmetic reads FP32 tensors, never dequantised ones
        if node.op_type in ("Sub", "Mul", "Resize", "ReduceMax"):
            assert not set(node.input) & quantized_inputs, node.name
    runtime = STPM.load(out)
    images = data.load_resized(data.train_images(category)[:4], runtime.input_size_)
    assert runtime.anomaly_maps(images).shape == (4, 1, *runtime.input_size_)


def test_bad_onnx_files_are_refused_in_one_line(trained, exported, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    with pytest.raises(StpmError, match="not a usable ONNX model"):
        STPM.load(garbage)
    foreign = onnx.load(str(exported))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(StpmError, match="not one written by stpm-export"):
        STPM.load(tmp_path / "foreign.onnx")
    with pytest.raises(StpmError, match="not found"):
        STPM.load(tmp_path / "missing.onnx")
    with pytest.raises(StpmError, match="ONNX export"):
        STPM.load(exported).save(tmp_path / "again.pt")
    with pytest.raises(StpmError, match="onnxruntime or openvino"):
        STPM.load(exported, runtime="torch")


def test_int8_refit_fits_the_term_and_threshold_on_the_files_own_scores(
    trained, category, tmp_path
):
    model, _ = trained
    exported = export_model(model.runtime_, tmp_path / "int8.onnx", category, int8=True, images=8)
    loaded = STPM.load(exported.path)
    assert loaded.runtime_.description.int8["refitted"] is True
    assert loaded.threshold_ == pytest.approx(exported.threshold)
    assert exported.threshold_before == model.threshold_
    _, validation = split_validation(data.train_images(category), 0.25, 0)
    scores = [prediction.score for _, prediction in loaded.predict_iter(validation)]
    assert scores == pytest.approx(loaded.validation_scores_, abs=1e-4)
