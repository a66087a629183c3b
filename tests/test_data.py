"""MVTec-style folders: what is found in them, what is checked, clear errors for bad ones."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from stpm import StpmError, data


def write(path, image):
    assert cv2.imwrite(str(path), image)
    return path


def test_category_errors_name_the_path(tmp_path):
    with pytest.raises(StpmError, match="no such folder"):
        data.train_images(tmp_path / "missing")
    with pytest.raises(StpmError, match="train/good"):
        data.train_images(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(StpmError, match="no images in"):
        data.train_images(tmp_path)


def test_category_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("STPM_DATA_ROOT", str(tmp_path))
    assert data.category_dir("bottle", None, None) == tmp_path / "bottle"
    assert data.category_dir("bottle", None, "/elsewhere") == data.Path("/elsewhere/bottle")
    assert data.category_dir(None, "/my/folder", None) == data.Path("/my/folder")
    with pytest.raises(StpmError, match="--category"):
        data.category_dir(None, None, None)


def test_test_samples_pair_images_with_masks(category):
    samples = data.test_samples(category)
    assert {sample.defect for sample in samples} == {"good", "scratch"}
    assert all((sample.mask is None) == (sample.defect == "good") for sample in samples)


def test_download_fails_fast_and_clearly_without_a_network(tmp_path):
    started = time.perf_counter()
    with pytest.raises(StpmError, match="cannot download MVTec AD"):
        data.download_mvtec_category("bottle", tmp_path, url="http://127.0.0.1:9/mvtec.tar.xz")
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "bottle").exists()


def test_data_checks_warn_with_one_summary(tmp_path):
    from .conftest import make_category

    root = make_category(tmp_path / "tiles")
    assert data.check_category(root).warnings == []
    train = sorted((root / "train" / "good").iterdir())
    (root / "train" / "good" / "copy.png").write_bytes(train[0].read_bytes())
    (root / "test" / "good" / "leak.png").write_bytes(train[1].read_bytes())
    write(root / "ground_truth" / "scratch" / "000_mask.png", np.zeros((10, 10), np.uint8))
    write(root / "ground_truth" / "scratch" / "orphan_mask.png", np.zeros((80, 80), np.uint8))
    (root / "ground_truth" / "good").mkdir()
    write(root / "ground_truth" / "good" / "000_mask.png", np.zeros((80, 80), np.uint8))
    (root / "ground_truth" / "scratch" / "001_mask.png").unlink()
    found = " | ".join(data.check_category(root).warnings)
    for expected in (
        "1 duplicate image(s) in train/good",
        "1 test image(s) also in train/good",
        "1 mask(s) of another size",
        "1 mask(s) with no matching image",
        "1 mask(s) for test/good",
        "1 defect image(s) without a mask",
    ):
        assert expected in found


def test_unreadable_training_images_are_listed_together(tmp_path):
    paths = [write(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))]
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"broken")
        paths.append(tmp_path / name)
    with pytest.raises(StpmError, match=r"2 unreadable training image\(s\).*a\.png.*b\.png"):
        data.load_resized(paths, (8, 8))
