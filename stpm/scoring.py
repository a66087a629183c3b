"""The one scoring path: an image in, a Prediction out.

    decode (a path, encoded bytes or an array) -> RGB uint8
    -> geometry: resized to the model's input, squashed or letterboxed (resize)
    -> normalised (normalize) -> the runtime (stpm.runtime): anomaly map and image term
    -> geometry back: a letterboxed map unpadded (unletterbox_map), then at the image's own size
    -> score = the map's maximum + the image term (image_scores) -> verdict against a threshold

`predict` runs it over many inputs, a batch at a time, decoding the next images in a background
thread while the runtime computes. Every caller scores this way: STPM.predict, stpm-predict,
stpm-eval, the INT8 refit and stpm-export's check (stpm.export), stpm.raydata and the scripts.
Training scores its validation images in batches of tensors (stpm.train) with the functions
below, and the ONNX graph's own `score` output computes the same rule in torch
(stpm.model.AnomalyMapModel); tests hold all three equal.

Safe to call from several threads at once: nothing here keeps state between calls, ONNX Runtime
and torch run concurrent calls, OpenVINO's runtime serialises the calls of each compiled batch
size (one infer request each), and OpenCV is made single-threaded while any thread is inside a
batch (opencv_single_threaded: its thread count is per process).
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .errors import ImageTooLarge, StpmError

if TYPE_CHECKING:
    from .runtime import Outputs, Runtime

# Larger images are refused before decoding: a 20000 x 20000 header would ask for 1.2 GB.
MAX_IMAGE_PIXELS = 100_000_000


@dataclass
class Prediction:
    """The verdict on one image. anomaly_map and mask have the image's own (H, W)."""

    path: str | None
    score: float  # raw: the map's maximum at the model's input size + the image term
    normalized_score: float  # in [0, 1]; 0 = typical good image, 0.5 = the threshold
    anomaly_map: np.ndarray  # (H, W) float32, per-pixel anomaly
    mask: np.ndarray  # (H, W) bool, pixels above the threshold
    is_anomalous: bool
    image: np.ndarray | None = field(default=None, repr=False)  # the decoded RGB, if asked for
    threshold: float = 0.0  # the raw threshold the verdict was taken against
    image_term: float = 0.0  # the image-level term in score (0 without an image model)

    @property
    def verdict(self) -> str:
        """The verdict in the word every output uses: "anomalous" or "good"."""
        return "anomalous" if self.is_anomalous else "good"

    @property
    def flagged_by_term(self) -> bool:
        """Anomalous only with its image term: the map's maximum alone stays at or under the
        threshold, so no pixel is above it (a change over the whole part, or a faint defect the
        term adds up)."""
        return self.is_anomalous and self.score - self.image_term <= self.threshold


# ----------------------------------------------------------------------------- decoding


# what the first bytes of a file say it is: the types decode_image reads
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WebP": ".webp"}


def image_kind(encoded: bytes) -> str | None:
    """PNG, JPEG, BMP, TIFF or WebP from a file's first bytes; None for anything else."""
    for signature, kind in SIGNATURES.items():
        if encoded.startswith(signature):
            return kind
    if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP":
        return "WebP"
    return None


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); grayscale, 16-bit and RGBA are converted."""
    path = Path(path)
    try:
        encoded = np.fromfile(path, dtype=np.uint8)  # also reads non-ASCII paths, unlike imread
    except OSError as error:
        raise StpmError(f"cannot read {path}: {error.strerror or error}") from None
    return decode_image(encoded, str(path))


def decode_image(
    encoded: bytes | np.ndarray, name: str = "the image", max_pixels: int | None = None
) -> np.ndarray:
    """Encoded bytes of a PNG, JPEG, BMP, TIFF or WebP file (8 or 16 bit) to RGB uint8 (H, W, 3);
    name says which image in an error. Over max_pixels (default MAX_IMAGE_PIXELS) it is refused
    from its header (ImageTooLarge)."""
    encoded = np.frombuffer(encoded, np.uint8) if isinstance(encoded, bytes) else encoded
    if encoded.size == 0:
        raise StpmError(f"cannot read {name}: the file is empty")
    check_pixel_count(encoded, name, max_pixels)
    image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise StpmError(f"cannot read {name}: not a decodable image (corrupt or unsupported)")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        return to_rgb(image)
    except StpmError as error:
        raise StpmError(f"cannot read {name}: {error}") from None


def check_pixel_count(
    encoded: bytes | np.ndarray,
    name: str = "the image",
    max_pixels: int | None = None,
    strict: bool = False,
) -> None:
    """Raise ImageTooLarge for an image over max_pixels (default MAX_IMAGE_PIXELS), read from its
    header alone, before a single pixel is decoded. A header Pillow cannot parse is left to
    OpenCV (its own cap is 2**30 pixels), or with strict=True refused (StpmError)."""
    from PIL import Image

    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    limit = f"over the limit of {max_pixels:,} (stpm.scoring.MAX_IMAGE_PIXELS); downscale it first"
    try:
        with warnings.catch_warnings():  # Pillow's notes on a damaged header: OpenCV decides
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(encoded)) as header:
                height, width = header.height, header.width
    except Image.DecompressionBombError:  # Pillow's own cap, above ours: too big either way
        raise ImageTooLarge(f"cannot read {name}: its pixel count is {limit}") from None
    except (OSError, ValueError, SyntaxError):
        if strict:
            raise StpmError(f"cannot read {name}: its header is damaged or unsupported") from None
        return  # a format Pillow cannot parse: OpenCV decides (it has its own 2**30 pixel cap)
    if height * width > max_pixels:
        raise ImageTooLarge(f"cannot read {name}: {width} x {height} pixels is {limit}")


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header alone, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as error:
        raise StpmError(f"cannot read {path}: {error}") from None


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any image array to RGB uint8 (H, W, 3).

    Accepts (H, W), (H, W, 1), (H, W, 3) RGB and (H, W, 4) RGBA; uint8, uint16 (full 16-bit
    range) or float in [0, 1]. Alpha is dropped: the camera sees the opaque part.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise StpmError(f"expected an image of shape (H, W) or (H, W, 1|3|4), got {image.shape}")
    if min(image.shape[:2]) < 1:
        raise StpmError(f"the image is empty (shape {image.shape})")
    if image.dtype == np.uint8:
        pass
    elif image.dtype == np.uint16:
        image = (image.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise StpmError("the image contains NaN or infinite values")
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise StpmError(f"unsupported pixel type {image.dtype}; use uint8, uint16 or float")
    if image.ndim == 2:
        # 0.05 ms for a tile where np.repeat takes 0.25
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(image[:, :, :3])


def decode(item: str | Path | bytes | np.ndarray) -> np.ndarray | StpmError:
    """A path, encoded bytes or an array to RGB uint8, or the error that stops it."""
    try:
        if isinstance(item, str | Path):
            return read_image(item)
        return decode_image(item) if isinstance(item, bytes) else to_rgb(item)
    except StpmError as error:
        return error


def source(item) -> str | None:
    """What a Prediction's path says of an input: the path, or None for bytes and arrays."""
    return str(item) if isinstance(item, str | Path) else None


# ----------------------------------------------------------------------------- geometry


def resize(image: np.ndarray, size: tuple[int, int], mode: str = "squash") -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to size = (height, width), area-averaged when shrinking.

    mode "squash" stretches it to fill size; "letterbox" keeps its aspect ratio and pads the
    rest with black (the network sees the part's true shape; see letterbox_box).
    """
    if mode == "squash":
        return _resize(image, size)
    top, left, height, width = letterbox_box(image.shape[:2], size)
    inner = _resize(image, (height, width))
    bottom, right = size[0] - height - top, size[1] - width - left
    return cv2.copyMakeBorder(inner, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def letterbox_box(shape: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an image of shape (h, w) lands inside size (H, W) when letterboxed, centred:
    (top, left, height, width)."""
    scale = min(size[0] / shape[0], size[1] / shape[1])
    height = min(size[0], max(1, round(shape[0] * scale)))
    width = min(size[1], max(1, round(shape[1] * scale)))
    return (size[0] - height) // 2, (size[1] - width) // 2, height, width


def unletterbox_map(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map of a letterboxed image -> the map of the image squashed to the same size: the
    padding cut off, the part stretched back. Everything after the network (scores, resizing
    to the image's own size, overlays, metrics) then reads maps one way for both modes."""
    size = anomaly_map.shape[-2:]
    top, left, height, width = letterbox_box(shape, size)
    inner = np.ascontiguousarray(anomaly_map[..., top : top + height, left : left + width])
    return cv2.resize(inner, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float (h, w) map bilinearly to size = (height, width), back to an image's own size."""
    height, width = size
    return cv2.resize(
        np.asarray(anomaly_map, np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), C-contiguous, scaled to [0, 1] then standardised.

    Numpy, in place after one copy: no torch thread pool wakes up beside the runtime's own.
    """
    planar = np.asarray(images).transpose(0, 3, 1, 2).astype(np.float32, order="C")
    planar -= (np.asarray(mean, np.float32) * np.float32(255.0))[:, None, None]
    planar /= (np.asarray(std, np.float32) * np.float32(255.0))[:, None, None]
    return planar


_opencv = threading.Lock()
_opencv_users = 0  # threads inside opencv_single_threaded
_opencv_threads = 1  # OpenCV's setting before the first of them entered


@contextlib.contextmanager
def opencv_single_threaded():
    """Run OpenCV on the calling thread only while inside the block; its setting comes back when
    the last thread inside leaves (the setting is per process, so threads share one).

    One image's resize is a fraction of a millisecond of work. Split over OpenCV's thread pool it
    fights the model runtime's own threads, which still spin from the last inference: measured on
    2 cores, OpenVINO's per-image latency went from 20 to 28 ms through that alone.
    """
    global _opencv_users, _opencv_threads
    with _opencv:
        if _opencv_users == 0:
            _opencv_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
        _opencv_users += 1
    try:
        yield
    finally:
        with _opencv:
            _opencv_users -= 1
            if _opencv_users == 0:
                cv2.setNumThreads(_opencv_threads)


# ----------------------------------------------------------------------------- the score


def map_maxima(maps: np.ndarray) -> np.ndarray:
    """Each map's maximum: (B, [1,] H, W) -> float64 (B,)."""
    return np.asarray(maps).reshape(len(maps), -1).max(axis=1).astype(np.float64)


def image_scores(maps: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """The image score, stpm's one rule: each map's maximum (at the model's input size, in the
    squashed geometry) plus the image's term (0 without an image model). (B, ...) -> (B,)."""
    return map_maxima(maps) + np.asarray(terms, np.float64)


def normalized_score(score: float, threshold: float, validation_mean: float | None) -> float:
    """A raw score mapped to [0, 1] linearly: the validation mean -> 0, the threshold -> 0.5."""
    reference = validation_mean if validation_mean is not None else 0.0
    if reference >= threshold:
        reference = 0.0
    spread = max(threshold - reference, 1e-12)  # a zero threshold makes every score 1
    return float(np.clip(0.5 * (score - reference) / spread, 0.0, 1.0))


# ----------------------------------------------------------------------------- the path


def run(runtime: Runtime, images: Sequence[np.ndarray], pooled: bool = False) -> Outputs:
    """RGB uint8 images of any sizes -> the runtime's outputs, maps at the input size in the
    squashed geometry (a letterboxed image's map unpadded): float32 (B, 1, H, W)."""
    description = runtime.description
    size = tuple(description.image_size)
    resized = [resize(image, size, description.resize_mode) for image in images]
    batch = resized[0][None] if len(resized) == 1 else np.stack(resized)
    return run_resized(runtime, batch, [image.shape[:2] for image in images], pooled)


def run_resized(
    runtime: Runtime,
    images: np.ndarray,
    shapes: Sequence[tuple[int, int]] | None = None,
    pooled: bool = False,
) -> Outputs:
    """uint8 images (B, H, W, 3) already at the input size -> the runtime's outputs. shapes: the
    images' own (h, w) before they were letterboxed, to unpad their maps; None takes the maps as
    the network gives them."""
    description = runtime.description
    outputs = runtime(normalize(images, description.mean, description.std), pooled=pooled)
    return replace(outputs, maps=to_squashed(outputs.maps, shapes, description.resize_mode))


def to_squashed(
    maps: np.ndarray, shapes: Sequence[tuple[int, int]] | None, resize_mode: str
) -> np.ndarray:
    """Maps (B, 1, H, W) as the network gives them -> in the squashed geometry: a letterboxed
    image's map unpadded (unletterbox_map; shapes are the images' own (h, w)). Unchanged for
    squashed images, or without shapes."""
    if shapes is None or resize_mode != "letterbox":
        return maps
    return np.stack(
        [unletterbox_map(m[0], shape)[None] for m, shape in zip(maps, shapes, strict=True)]
    )


def predict(
    runtime: Runtime,
    inputs: Iterable[str | Path | bytes | np.ndarray],
    threshold: float,
    validation_mean: float | None = None,
    batch_size: int = 16,
    full_resolution: bool = True,
    keep_images: bool = False,
) -> Iterator[tuple[str | None, Prediction | StpmError]]:
    """Yield (source, Prediction or the error that stopped that image), in input order.

    One bad image does not stop the others: the caller decides what an error means.
    full_resolution=False keeps maps at the model's input size (cheaper, for evaluation);
    keep_images=True hands each decoded image back in Prediction.image (to draw on).
    """
    pending: list[tuple[str | None, np.ndarray]] = []
    settings = (runtime, threshold, validation_mean, full_resolution, keep_images)
    for name, image in decode_ahead(inputs, lookahead=batch_size + 1):
        if isinstance(image, StpmError):
            yield from _predict_batch(pending, *settings)
            pending = []
            yield name, image
            continue
        pending.append((name, image))
        if len(pending) == batch_size:
            yield from _predict_batch(pending, *settings)
            pending = []
    yield from _predict_batch(pending, *settings)


def _predict_batch(
    batch: list[tuple[str | None, np.ndarray]],
    runtime: Runtime,
    threshold: float,
    validation_mean: float | None,
    full_resolution: bool,
    keep_images: bool,
) -> Iterator[tuple[str | None, Prediction]]:
    if not batch:
        return
    with opencv_single_threaded():
        outputs = run(runtime, [image for _, image in batch])
        scores = image_scores(outputs.maps, outputs.terms).tolist()
        maps = outputs.maps[:, 0]
        if full_resolution:
            maps = [
                resize_map(m, image.shape[:2]) for m, (_, image) in zip(maps, batch, strict=True)
            ]
    for (name, image), anomaly_map, score, term in zip(
        batch, maps, scores, outputs.terms.tolist(), strict=True
    ):
        kept = image if keep_images else None
        yield name, judge(name, score, term, anomaly_map, threshold, validation_mean, kept)


def judge(
    name: str | None,
    score: float,
    image_term: float,
    anomaly_map: np.ndarray,
    threshold: float,
    validation_mean: float | None,
    image: np.ndarray | None = None,
) -> Prediction:
    """The verdict on a scored image against a threshold: anomalous above it, and the mask of the
    pixels above it."""
    return Prediction(
        path=name,
        score=score,
        normalized_score=normalized_score(score, threshold, validation_mean),
        anomaly_map=anomaly_map,
        mask=anomaly_map > threshold,
        is_anomalous=score > threshold,
        image=image,
        threshold=threshold,
        image_term=image_term,
    )


def with_threshold(
    prediction: Prediction, threshold: float, validation_mean: float | None
) -> Prediction:
    """The same image judged against another threshold (nothing is scored again)."""
    p = prediction
    return judge(p.path, p.score, p.image_term, p.anomaly_map, threshold, validation_mean, p.image)


def peak(anomaly_map: np.ndarray) -> tuple[int, int]:
    """Where the map is highest: (x, y) in pixels of the map, (0, 0) top left."""
    row, column = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    return int(column), int(row)


def boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The bounding boxes (x, y, width, height) of the mask's connected regions (8-connected),
    largest first."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    regions = sorted(stats[1:count].tolist(), key=lambda region: -region[4])
    return [tuple(region[:4]) for region in regions]


def decode_ahead(
    inputs: Iterable[str | Path | bytes | np.ndarray], lookahead: int
) -> Iterator[tuple[str | None, np.ndarray | StpmError]]:
    """(source, RGB image or the error reading it), in order.

    One input is decoded right here (the camera case: a thread would only add latency). More
    are decoded in a background thread while the model runs on the current batch: OpenCV
    releases the GIL while it decodes. lookahead bounds how many wait in memory.
    """
    items = iter(inputs)
    first = [item for item in (next(items, _END) for _ in range(2)) if item is not _END]
    if len(first) < 2:
        for item in first:
            yield source(item), decode(item)
        return
    pool, queue = ThreadPoolExecutor(max_workers=1), deque()
    try:
        for item in chain(first, items):
            queue.append((source(item), pool.submit(decode, item)))
            if len(queue) > lookahead:
                name, future = queue.popleft()
                yield name, future.result()
        while queue:
            name, future = queue.popleft()
            yield name, future.result()
    finally:  # also when the caller stops early: no waiting for decodes nobody reads
        pool.shutdown(wait=False, cancel_futures=True)


_END = object()
