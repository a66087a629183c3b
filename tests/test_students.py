"""Students unlike the teacher: each kind trains, reloads from its file with the same maps, and
exports to ONNX with the torch maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stpm import STPM, StpmError
from stpm.export import export_model
from stpm.networks import ProjectedStudent, build_student, build_teacher, pyramid_indices

from .conftest import TINY


@pytest.fixture(scope="module")
def teacher():
    network, _ = build_teacher("tf_efficientnet_lite0", (1, 2, 3), False)
    return network


@pytest.mark.parametrize("kind", ["slim", "resnet18"])
def test_a_student_kind_has_the_teachers_levels(teacher, kind):
    student = build_student(kind, teacher)
    assert isinstance(student, ProjectedStudent)
    images = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = student(images), teacher(images)
    assert [level.shape for level in ours] == [level.shape for level in theirs]
    slim_parameters = sum(p.numel() for p in student.parameters())
    assert slim_parameters != sum(p.numel() for p in teacher.parameters())


def test_the_slim_student_is_narrower_than_the_teacher(teacher):
    slim = build_student("slim", teacher)
    assert slim.features.feature_info.channels() == [16, 24, 56]  # the teacher: 24, 40, 112
    assert pyramid_indices("resnet18", (4, 8, 16)) == (1, 2, 3)
    assert sum(p.numel() for p in slim.parameters()) < 0.5 * sum(
        p.numel() for p in teacher.parameters()
    )
    with pytest.raises(StpmError, match="unknown student"):
        build_student("no_such_net", teacher)


def test_slim_halves_any_efficientnet_lite_and_refuses_other_teachers():
    lite2, _ = build_teacher("tf_efficientnet_lite2", (2, 3), False)
    slim = build_student("slim", lite2)
    assert slim.features.feature_info.channels() == [24, 64]  # half of Lite2's 48, 120 (rounded)
    resnet, _ = build_teacher("resnet18", (1, 2), False)
    with pytest.raises(StpmError, match="student='same'"):
        build_student("slim", resnet)


@pytest.mark.parametrize("kind", ["slim", "resnet18"])
def test_each_kind_trains_reloads_and_exports_with_the_same_maps(category, tmp_path, kind):
    model = STPM(**{**TINY, "epochs": 2, "student": kind}).fit(category, run_dir=tmp_path / "run")
    assert model.history_[-1]["loss"] < model.history_[0]["loss"] * 1.5
    loaded = STPM.load(tmp_path / "run" / "model.pt", device="cpu")
    assert loaded.student == kind
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(model.anomaly_maps(images), loaded.anomaly_maps(images))
    path = export_model(loaded.runtime_, tmp_path / "model.onnx", check=False).path
    exported = STPM.load(path)
    assert np.abs(exported.anomaly_maps(images) - loaded.anomaly_maps(images)).max() < 1e-4
    with pytest.raises(StpmError, match="unknown student"):
        STPM(**{**TINY, "student": "no_such_net"}).fit(category)
