"""The one scoring path (stpm.scoring): any image decodes to RGB uint8 from a path, bytes or an
array; training's validation scores and the ONNX graph's own score follow its rule; it gives the
same results from eight threads at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch

from stpm import STPM, StpmError, scoring


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
    rgb = scoring.read_image(write(tmp_path / "image.png", image))
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert (rgb == 200).all()


def test_colour_channels_come_back_in_rgb_order(tmp_path):
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's order
    rgb = scoring.read_image(write(tmp_path / "red.png", bgr))
    assert rgb[0, 0].tolist() == [255, 0, 0]


def test_arrays_of_other_types_are_converted():
    assert scoring.to_rgb(np.ones((3, 3), np.float32))[0, 0].tolist() == [255, 255, 255]
    assert scoring.to_rgb(np.zeros((3, 3, 1), np.uint8)).shape == (3, 3, 3)
    with pytest.raises(StpmError, match="NaN"):
        scoring.to_rgb(np.full((3, 3), np.nan, np.float32))
    with pytest.raises(StpmError, match="shape"):
        scoring.to_rgb(np.zeros((3, 3, 2), np.uint8))
    with pytest.raises(StpmError, match="pixel type"):
        scoring.to_rgb(np.zeros((3, 3), np.int64))


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_files_name_the_path(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(StpmError, match="broken.png"):
        scoring.read_image(path)


def test_normalize_matches_the_formula():
    images = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    out = scoring.normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (1, 3, 1, 1) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out.ravel(), [-1.0, 128 / 127.5 - 1, 1.0], rtol=1e-6)


def test_huge_images_are_refused_from_their_header(tmp_path, monkeypatch):
    path = write(tmp_path / "big.png", np.zeros((300, 400), np.uint8))
    monkeypatch.setattr(scoring, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(StpmError, match="400 x 300 pixels is over the limit"):
        scoring.read_image(path)
    monkeypatch.setattr(scoring, "MAX_IMAGE_PIXELS", 120_000)
    assert scoring.read_image(path).shape == (300, 400, 3)


@pytest.mark.parametrize("extension", [".png", ".jpg", ".bmp", ".tif"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_encoded_bytes_decode_as_the_file_does(tmp_path, extension, dtype):
    if dtype == np.uint16 and extension in (".jpg", ".bmp"):
        pytest.skip("JPEG and BMP files are 8-bit")
    image = (np.arange(48 * 64).reshape(48, 64) % 251).astype(dtype) * (
        257 if dtype == np.uint16 else 1
    )
    path = write(tmp_path / f"image{extension}", np.dstack([image] * 3))
    from_bytes = scoring.decode_image(path.read_bytes(), "a camera frame")
    assert np.array_equal(from_bytes, scoring.read_image(path))
    assert from_bytes.shape == (48, 64, 3) and from_bytes.dtype == np.uint8
    with pytest.raises(StpmError, match="a camera frame"):
        scoring.decode_image(path.read_bytes()[:40], "a camera frame")


def test_predict_takes_paths_bytes_and_arrays_alike(trained, category):
    model, _ = trained
    path = sorted((category / "test" / "scratch").iterdir())[0]
    from_path, from_bytes, from_array = model.predict(
        [path, path.read_bytes(), scoring.read_image(path)]
    )
    assert from_path.path == str(path) and from_bytes.path is None
    for other in (from_bytes, from_array):
        assert other.score == from_path.score and np.array_equal(
            other.anomaly_map, from_path.anomaly_map
        )
    assert from_path.threshold == model.threshold_
    _, small = next(model.predict_iter([path], full_resolution=False))  # at the input size
    assert small.image_term == pytest.approx(small.score - small.anomaly_map.max(), abs=1e-6)


def test_training_scores_its_validation_images_as_prediction_does(trained):
    """Training's batched tensors and the scoring path give the same scores: the threshold is
    set on what prediction will compute (letterboxed models: tests/test_geometry.py)."""
    model, _ = trained
    scores = [prediction.score for prediction in model.predict(model.validation_images_)]
    np.testing.assert_allclose(scores, model.validation_scores_, rtol=1e-5, atol=1e-6)


def test_the_graphs_own_score_is_scorings_rule(trained, onnx_file):
    """The score output of the torch model and of its ONNX export: the map's maximum plus the
    term, as stpm.scoring.image_scores computes it from the maps and terms."""
    import onnxruntime

    model, _ = trained
    images = np.random.default_rng(0).integers(0, 256, (3, *model.input_size_, 3), np.uint8)
    normalized = scoring.normalize(images, model.mean_, model.std_)
    with torch.inference_mode():
        maps, graph_scores, terms = model.runtime_.model(torch.from_numpy(normalized))
    rule = scoring.image_scores(maps.numpy(), terms.numpy())
    np.testing.assert_allclose(graph_scores.numpy(), rule, rtol=1e-6)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    maps, graph_scores, terms = session.run(
        ["anomaly_map", "score", "image_term"], {"images": normalized}
    )
    np.testing.assert_allclose(graph_scores, scoring.image_scores(maps, terms), rtol=1e-6)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_eight_threads_at_once_get_the_single_threaded_results(onnx_file, category, runtime):
    """Each thread scores every test image with its own batch size (OpenVINO compiles one
    graph per batch size): the results are those of one thread, bit for bit."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
    model = STPM.load(onnx_file, runtime=runtime, threads=1)
    paths = sorted((category / "test").rglob("*.png"))
    sizes = [1 + thread % 3 for thread in range(8)]
    alone = {size: model.predict(paths, batch_size=size) for size in set(sizes)}
    opencv_threads = cv2.getNumThreads()
    start = threading.Barrier(8)

    def score(size: int) -> list:
        start.wait()  # all eight at once
        return model.predict(paths, batch_size=size)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(score, sizes))
    for size, predictions in zip(sizes, together, strict=True):
        for ours, reference in zip(predictions, alone[size], strict=True):
            assert ours.score == reference.score and ours.is_anomalous == reference.is_anomalous
            assert np.array_equal(ours.anomaly_map, reference.anomaly_map)
    assert cv2.getNumThreads() == opencv_threads  # OpenCV's setting is back


def test_a_batch_size_scores_as_batches_of_one(onnx_file, category):
    model = STPM.load(onnx_file)
    paths = sorted((category / "test").rglob("*.png"))
    ones, fours = model.predict(paths, batch_size=1), model.predict(paths, batch_size=4)
    np.testing.assert_allclose([p.score for p in ones], [p.score for p in fours], rtol=1e-5)
