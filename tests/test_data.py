"""Images of every common kind become RGB uint8; bad folders and files give clear errors."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from stpm import StpmError, data


def write(path, image):
    assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize(
    "image",
    [
        np.full((5, 7), 200, np.uint8),  # grayscale
        np.full((5, 7, 3), 200, np.uint8),  # BGR on disk
        np.dstack([np.full((5, 7, 3), 200, np.uint8), np.zeros((5, 7), np.uint8)]),  # with alpha
        np.full((5, 7), 200 * 257, np.uint16),  # 16-bit
    ],
    ids=["gray", "rgb", "rgba", "16bit"],
)
def test_any_png_reads_as_rgb_uint8(tmp_path, image):
    rgb = data.read_image(write(tmp_path / "image.png", image))
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert (rgb == 200).all()


def test_colour_channels_come_back_in_rgb_order(tmp_path):
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's order
    rgb = data.read_image(write(tmp_path / "red.png", bgr))
    assert rgb[0, 0].tolist() == [255, 0, 0]


def test_arrays_of_other_types_are_converted():
    assert data.to_rgb(np.ones((3, 3), np.float32))[0, 0].tolist() == [255, 255, 255]
    assert data.to_rgb(np.zeros((3, 3, 1), np.uint8)).shape == (3, 3, 3)
    with pytest.raises(StpmError, match="NaN"):
        data.to_rgb(np.full((3, 3), np.nan, np.float32))
    with pytest.raises(StpmError, match="shape"):
        data.to_rgb(np.zeros((3, 3, 2), np.uint8))
    with pytest.raises(StpmError, match="pixel type"):
        data.to_rgb(np.zeros((3, 3), np.int64))


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_files_name_the_path(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(StpmError, match="broken.png"):
        data.read_image(path)


def test_normalize_matches_the_formula():
    images = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    out = data.normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (1, 3, 1, 1) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out.ravel(), [-1.0, 128 / 127.5 - 1, 1.0], rtol=1e-6)


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


def test_huge_images_are_refused_from_their_header(tmp_path, monkeypatch):
    path = write(tmp_path / "big.png", np.zeros((300, 400), np.uint8))
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(StpmError, match="400 x 300 pixels is over the limit"):
        data.read_image(path)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 120_000)
    assert data.read_image(path).shape == (300, 400, 3)


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
