"""Compression: a pruned student keeps its level shapes and reloads from its file with identical
maps; a shared stem is the teacher's own; a compact model survives export and INT8 with maps
close to its FP32 version; the INT8 file records reduce_range, and a CPU without VNNI is
warned about a file made without it."""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch

from stpm import STPM, StpmError, compress, export, runtime
from stpm.cli import compress_main
from stpm.compress import count_parameters, prune_student
from stpm.networks import build_student, build_teacher

from .conftest import TINY

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def compact(trained, tmp_path_factory):
    """The tiny trained model pruned by half and its stem shared, fine-tuned 2 epochs."""
    _, run_dir = trained
    out = tmp_path_factory.mktemp("compact") / "run"
    model = compress.compress(
        run_dir / "model.pt",
        json.loads((run_dir / "config.json").read_text())["data"],
        prune=0.5,
        share_stem=True,
        epochs=2,
        run_dir=out,
        device="cpu",
    )
    return model, out


def test_pruning_keeps_the_level_shapes_and_removes_channels():
    teacher, _ = build_teacher("tf_efficientnet_lite0", (1, 2, 3), False)
    student = build_student("slim", teacher)
    pruned = prune_student(copy.deepcopy(student), 0.5, (64, 64))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert [t.shape for t in pruned(images)] == [t.shape for t in student(images)]
    assert count_parameters(pruned) < 0.8 * count_parameters(student)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(width % 8 == 0 for width in widths)  # blocked kernels still apply
    with pytest.raises(StpmError, match="share of channels"):
        prune_student(student, 1.5, (64, 64))


def test_a_compact_model_reloads_with_identical_maps(compact):
    model, run_dir = compact
    assert model.pruning_["parameters_after"] < model.pruning_["parameters_before"]
    assert model.shared_layers_ == ["features.conv_stem", "features.bn1"]
    network = model.runtime_.model.network
    assert network.student.features.conv_stem is network.teacher.conv_stem
    state = torch.load(run_dir / "model.pt", weights_only=True)  # shapes stored as data
    assert state["pruning"]["ratio"] == 0.5
    loaded = STPM.load(run_dir / "model.pt", device="cpu")
    reloaded = loaded.runtime_.model.network
    assert reloaded.student.features.conv_stem is reloaded.teacher.conv_stem
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(model.anomaly_maps(images), loaded.anomaly_maps(images))
    assert loaded.validation_scores_ == model.validation_scores_


def test_a_compact_model_survives_export_and_int8(compact, category, tmp_path):
    model, _ = compact
    fp32 = export.export_model(model.runtime_, tmp_path / "model.onnx", check=False).path
    images = export.calibration_images(category, model.input_size_, 8)
    exported = export.export_model(model.runtime_, tmp_path / "int8.onnx", category, True, 8)
    int8 = exported.path
    assert exported.check["map_correlation"] > 0.8 and exported.int8["refitted"] is True
    assert fp32.stat().st_size > 2.5 * int8.stat().st_size
    ours = STPM.load(fp32).anomaly_maps(images)
    assert np.abs(ours - model.anomaly_maps(images)).max() < 1e-4
    quantised = STPM.load(int8).anomaly_maps(images)
    assert np.corrcoef(ours.ravel(), quantised.ravel())[0, 1] > 0.8
    # the stem runs once in the graph: ONNX Runtime's optimiser merges the copy
    graph = STPM.load(fp32).runtime_.description
    assert graph.shared_layers == ["features.conv_stem", "features.bn1"]


def test_reduce_range_is_recorded_and_a_cpu_without_vnni_is_warned(
    trained, category, tmp_path, monkeypatch
):
    model, _ = trained
    fp32 = export.export_model(model.runtime_, tmp_path / "model.onnx", check=False).path
    images = export.calibration_images(category, model.input_size_, 4)
    made_here = export.quantize_int8(fp32, tmp_path / "auto.onnx", images, model.mean_, model.std_)
    full = export.quantize_int8(
        fp32, tmp_path / "full.onnx", images, model.mean_, model.std_, reduce_range=False
    )
    assert STPM.load(made_here).runtime_.description.int8["reduce_range"] == (
        not runtime.has_vnni()
    )
    assert STPM.load(full).runtime_.description.int8["reduce_range"] is False
    monkeypatch.setattr(runtime, "has_vnni", lambda: False)
    runtime._warned_saturation.clear()
    with pytest.warns(UserWarning, match="reduce_range"):
        STPM.load(full)
    with warnings.catch_warnings():  # once per file
        warnings.simplefilter("error")
        STPM.load(full)
    reduced = export.quantize_int8(
        fp32, tmp_path / "reduced.onnx", images, model.mean_, model.std_, reduce_range=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        STPM.load(reduced)
        STPM.load(fp32)


def test_stpm_compress_writes_a_run_folder_and_refuses_nonsense(trained, tmp_path, capsys):
    _, run_dir = trained
    out = tmp_path / "pruned"
    assert compress_main([str(run_dir), "--prune", "0.25", "--epochs", "1", "--out", str(out)]) == 0
    assert (out / "model.pt").is_file() and (out / "config.json").is_file()
    assert re.search(r"parameters \(\d+% remain\)", capsys.readouterr().out)
    assert compress_main([str(run_dir), "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    assert "nothing to compress" in capsys.readouterr().err
    assert compress_main([str(tmp_path / "missing"), "--prune", "0.5"]) == 2
    resnet = STPM(**{**TINY, "epochs": 1, "student": "resnet18", "share_stem": True})
    with pytest.raises(StpmError, match="nothing to share"):
        resnet.fit(json.loads((run_dir / "config.json").read_text())["data"])
