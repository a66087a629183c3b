"""Fuzzing the image loader and predict: every input works or raises StpmError, quickly.

The counters at the bottom record how many inputs each strategy tried (printed with -s).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from stpm import STPM, StpmError, scoring

TRIED: Counter = Counter()
FAST = settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def load(tmp_path, content: bytes, suffix: str = ".png"):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        image = scoring.read_image(path)
    except StpmError:
        return None
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return image


def encoded(image: np.ndarray, extension: str) -> bytes:
    ok, buffer = cv2.imencode(extension, image)
    assert ok
    return buffer.tobytes()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with an empty pixel stream behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@FAST
@given(
    content=st.binary(max_size=2048),
    suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif", ".txt"]),
)
def test_random_bytes(tmp_path, content, suffix):
    TRIED["random bytes"] += 1
    load(tmp_path, content, suffix)


@FAST
@given(
    pixels=hnp.arrays(
        np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([1, 3]))
    ),
    extension=st.sampled_from([".png", ".jpg", ".bmp", ".tiff"]),
    cut=st.floats(0.0, 1.0),
    wrong_suffix=st.booleans(),
)
def test_truncated_and_misnamed_files(tmp_path, pixels, extension, cut, wrong_suffix):
    TRIED["truncated or misnamed"] += 1
    content = encoded(pixels, extension)
    truncated = content[: int(len(content) * cut)]
    suffix = ".jpg" if wrong_suffix and extension != ".jpg" else extension
    load(tmp_path, truncated, suffix)
    whole = load(tmp_path, content, suffix)
    assert whole is not None and whole.shape[:2] == pixels.shape[:2]


@FAST
@given(width=st.sampled_from([1, 7, 20000, 65535]), height=st.sampled_from([1, 9, 20000]))
def test_headers_of_any_size_without_data(tmp_path, width, height):
    TRIED["crafted headers"] += 1
    if width * height > scoring.MAX_IMAGE_PIXELS:
        with pytest.raises(StpmError, match="over the limit"):
            scoring.read_image(_write(tmp_path, png_header(width, height)))
    else:
        assert load(tmp_path, png_header(width, height)) is None  # no pixel data: unreadable


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_pillow_mode(tmp_path, mode):
    TRIED["pixel formats"] += 1
    image = Image.new(mode, (13, 11))
    for extension, format_name in ((".png", "PNG"), (".jpg", "JPEG"), (".tif", "TIFF")):
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=format_name)
        except (OSError, KeyError, ValueError):
            continue  # Pillow cannot write this mode in this format
        result = load(tmp_path, buffer.getvalue(), extension)
        assert result is None or result.shape == (11, 13, 3)


def test_one_by_one_and_huge_dimensions(tmp_path):
    TRIED["pixel formats"] += 1
    assert load(tmp_path, encoded(np.zeros((1, 1), np.uint8), ".png")).shape == (1, 1, 3)
    with pytest.raises(StpmError, match="over the limit"):
        scoring.read_image(_write(tmp_path, png_header(20000, 20000)))


@FAST
@given(content=st.binary(max_size=1024), zipped=st.booleans())
def test_random_model_files(tmp_path, content, zipped):
    """Garbage, and garbage inside torch's zip container, is refused with StpmError."""
    TRIED["model files"] += 1
    path = tmp_path / "model.pt"
    if zipped:  # torch's own container around garbage
        torch.save({"format": "stpm-model"}, path)
        content = path.read_bytes()[: len(content)] + content
    path.write_bytes(content)
    with pytest.raises(StpmError):
        STPM.load(path)


ARRAYS = hnp.arrays(
    dtype=st.sampled_from(
        [np.uint8, np.uint16, np.float32, np.float64, np.int32, np.bool_, np.complex64]
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    elements=None,
)


@settings(max_examples=200, deadline=5000, suppress_health_check=list(HealthCheck))
@given(array=ARRAYS)
def test_predict_on_any_array(trained, array):
    TRIED["arrays for predict"] += 1
    model, _ = trained
    try:
        predictions = model.predict(array)
    except StpmError:
        return
    assert len(predictions) == (array.shape[0] if array.ndim == 4 else 1)  # 4-D: a batch
    for prediction in predictions:
        assert np.isfinite(prediction.score) and prediction.anomaly_map.ndim == 2


def _write(tmp_path, content: bytes):
    path = tmp_path / "header.png"
    path.write_bytes(content)
    return path


def test_report_counts():
    print("\nfuzz inputs tried:", dict(TRIED), "total", sum(TRIED.values()))
    assert sum(TRIED.values()) > 0
