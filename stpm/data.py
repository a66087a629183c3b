"""Images in, tensors out: MVTec-style folders, single images, and checks on both.

Folder layout (MVTec AD): <category>/train/good/*.png, <category>/test/<defect>/*.png,
<category>/ground_truth/<defect>/<name>_mask.png. Masks are optional for test/good.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import distributed
from .errors import StpmError

# Larger images are refused before decoding: a 20000 x 20000 header would ask for 1.2 GB.
MAX_IMAGE_PIXELS = 100_000_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_ROOT_VARIABLE = "STPM_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("data/mvtec_ad")
# The dataset's official archive (all 15 categories, about 4.9 GB); only the asked-for category
# is extracted from the stream.
MVTEC_AD_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)


# ----------------------------------------------------------------------------- single images


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); grayscale, 16-bit and RGBA are converted."""
    path = Path(path)
    try:
        encoded = np.fromfile(path, dtype=np.uint8)  # also reads non-ASCII paths, unlike imread
    except OSError as error:
        raise StpmError(f"cannot read {path}: {error.strerror or error}") from None
    if encoded.size == 0:
        raise StpmError(f"cannot read {path}: the file is empty")
    _check_pixel_count(path, encoded)
    image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise StpmError(f"cannot read {path}: not a decodable image (corrupt or unsupported)")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        return to_rgb(image)
    except StpmError as error:
        raise StpmError(f"cannot read {path}: {error}") from None


def _check_pixel_count(path: Path, encoded: np.ndarray) -> None:
    """Refuse images over MAX_IMAGE_PIXELS from their header, before decoding a single pixel."""
    limit = (
        f"over the limit of {MAX_IMAGE_PIXELS:,} (stpm.data.MAX_IMAGE_PIXELS); downscale it first"
    )
    try:
        with Image.open(io.BytesIO(encoded.tobytes())) as header:
            height, width = header.height, header.width
    except Image.DecompressionBombError:  # Pillow's own cap, above ours: too big either way
        raise StpmError(f"cannot read {path}: its pixel count is {limit}") from None
    except (OSError, ValueError, SyntaxError):
        return  # a format Pillow cannot parse: OpenCV decides (it has its own 2**30 pixel cap)
    if height * width > MAX_IMAGE_PIXELS:
        raise StpmError(f"cannot read {path}: {width} x {height} pixels is {limit}")


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header alone, without decoding the pixels."""
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


RESIZE_MODES = ("squash", "letterbox")


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


@contextlib.contextmanager
def opencv_single_threaded():
    """Run OpenCV on the calling thread only, inside the block; its setting is restored after.

    One image's resize is a fraction of a millisecond of work. Split over OpenCV's thread pool it
    fights the model runtime's own threads, which still spin from the last inference: measured on
    2 cores, OpenVINO's per-image latency went from 20 to 28 ms through that alone.
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float (h, w) map bilinearly to size = (height, width), back to an image's own size."""
    height, width = size
    return cv2.resize(
        np.asarray(anomaly_map, np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )


def normalize(
    images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), C-contiguous, scaled to [0, 1] then standardised.

    Numpy, in place after one copy: no torch thread pool wakes up beside the runtime's own.
    """
    planar = np.asarray(images).transpose(0, 3, 1, 2).astype(np.float32, order="C")
    planar -= (np.asarray(mean, np.float32) * np.float32(255.0))[:, None, None]
    planar /= (np.asarray(std, np.float32) * np.float32(255.0))[:, None, None]
    return planar


def load_resized(
    paths: Sequence[Path], size: tuple[int, int], desc: str = "loading", mode: str = "squash"
) -> torch.Tensor:
    """Decode and resize (by mode, see resize) every image once: uint8 (N, H, W, 3).

    Training has no random augmentation, so this cache is exact and spares a decode per epoch.
    """
    batch = torch.empty((len(paths), size[0], size[1], 3), dtype=torch.uint8)
    failures = []
    for index, path in enumerate(
        tqdm(paths, desc=desc, unit="img", leave=False, disable=distributed.secondary())
    ):
        try:
            batch[index] = torch.from_numpy(resize(read_image(path), size, mode))
        except StpmError as error:
            failures.append(str(error))
    if failures:  # all of them at once, not one per attempt
        shown = "; ".join(failures[:3]) + (
            f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        )
        raise StpmError(
            f"{len(failures)} unreadable training image(s), fix or remove them: {shown}"
        )
    return batch


# ----------------------------------------------------------------------------- folders


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files inside folder (and its sub-folders if recursive), sorted by path."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def data_root(explicit: str | Path | None = None) -> Path:
    """Where categories live: the flag, else $STPM_DATA_ROOT, else ./data/mvtec_ad."""
    return Path(explicit or os.environ.get(DATA_ROOT_VARIABLE) or DEFAULT_DATA_ROOT)


def category_dir(category: str | None, data: str | Path | None, root: str | Path | None) -> Path:
    """Resolve --data PATH or --category NAME (under the data root) to a category folder."""
    if data is not None:
        return Path(data)
    if not category:
        raise StpmError("name a category (--category bottle) or a folder (--data PATH)")
    return data_root(root) / category


def categories(root: str | Path) -> list[str]:
    """The category folders under a data root: those with a train/good folder, by name."""
    root = Path(root)
    if not root.is_dir():
        raise StpmError(f"no such data root: {root}")
    found = sorted(path.name for path in root.iterdir() if (path / "train" / "good").is_dir())
    if not found:
        raise StpmError(f"no categories under {root} (folders with a train/good folder)")
    return found


@dataclass
class TestSample:
    """One test image: its defect type ('good' for none) and its mask file, if any."""

    path: Path
    defect: str
    mask: Path | None


def train_images(category: Path) -> list[Path]:
    """The defect-free training images of a category; clear errors when there are none."""
    if not category.is_dir():
        raise StpmError(
            f"no such folder: {category} (point --data at an MVTec-style category, or use "
            "--download for an MVTec AD category)"
        )
    good = category / "train" / "good"
    if not good.is_dir():
        raise StpmError(f"{category} has no train/good folder; expected the MVTec layout")
    images = list_images(good)
    if not images:
        raise StpmError(f"no images in {good} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return images


def test_samples(category: Path) -> list[TestSample]:
    """Every image under test/<defect>/ with its mask from ground_truth/<defect>/."""
    test = category / "test"
    if not test.is_dir():
        raise StpmError(f"{category} has no test folder; expected the MVTec layout")
    samples = []
    for defect_dir in sorted(path for path in test.iterdir() if path.is_dir()):
        for image in list_images(defect_dir):
            mask = category / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
            samples.append(TestSample(image, defect_dir.name, mask if mask.is_file() else None))
    if not samples:
        raise StpmError(f"no images under {test}")
    return samples


@dataclass
class DataReport:
    """What check_category found. Nothing here stops training; unreadable images do (later)."""

    warnings: list[str]


def check_category(category: Path) -> DataReport:
    """Checks before training, from file bytes and headers only (no decoding).

    Warned about, not fatal: duplicate files in train/good (wasted work), test images identical
    to a training image (evaluation would flatter the model), masks whose size differs from
    their image, masks with no image, masks for test/good, defect images without a mask.
    Unreadable training images stop training when they are decoded (all listed at once).
    """
    warnings = []
    train = train_images(category)
    by_content: dict[str, list[Path]] = {}
    for path in train:
        by_content.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(path)
    duplicates = [paths for paths in by_content.values() if len(paths) > 1]
    if duplicates:
        warnings.append(
            f"{sum(len(p) - 1 for p in duplicates)} duplicate image(s) in train/good, e.g. "
            + " = ".join(path.name for path in duplicates[0])
        )
    if not (category / "test").is_dir():
        return DataReport(warnings)
    samples = test_samples(category)
    leaked = [
        s.path for s in samples if hashlib.sha256(s.path.read_bytes()).hexdigest() in by_content
    ]
    if leaked:
        warnings.append(f"{len(leaked)} test image(s) also in train/good, e.g. {leaked[0]}")
    mismatched = []
    for sample in samples:
        if sample.mask is not None and image_shape(sample.mask) != image_shape(sample.path):
            mismatched.append(sample.mask)
    if mismatched:
        warnings.append(
            f"{len(mismatched)} mask(s) of another size than their image, e.g. {mismatched[0]}"
        )
    expected = {s.mask for s in samples if s.mask is not None}
    truth = category / "ground_truth"
    masks = set(truth.rglob("*_mask.png")) if truth.is_dir() else set()
    orphans = sorted(masks - expected)
    if orphans:
        warnings.append(f"{len(orphans)} mask(s) with no matching image, e.g. {orphans[0]}")
    good_masks = [s.mask for s in samples if s.defect == "good" and s.mask is not None]
    if good_masks:
        warnings.append(f"{len(good_masks)} mask(s) for test/good images, e.g. {good_masks[0]}")
    unmasked = [s.path for s in samples if s.defect != "good" and s.mask is None]
    if unmasked:
        warnings.append(
            f"{len(unmasked)} defect image(s) without a mask (pixel metrics count them as "
            f"all-good pixels), e.g. {unmasked[0]}"
        )
    return DataReport(warnings)


# ----------------------------------------------------------------------------- download


def download_mvtec_category(
    category: str, root: str | Path, url: str = MVTEC_AD_URL, timeout: float = 20.0
) -> Path:
    """Fetch one MVTec AD category into root/category from the official archive.

    The archive is streamed and only the category's files are kept; they land in a temporary
    folder first, so an interrupted download leaves nothing half-written behind.
    """
    root = Path(root)
    target = root / category
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StpmError(
            f"cannot download MVTec AD from {url} ({reason}); without internet, download it "
            f"elsewhere and unpack it so that {target}/train/good exists"
        ) from None
    total = int(response.headers.get("Content-Length") or 0) or None
    with (
        tempfile.TemporaryDirectory(dir=root) as staging,
        response,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"MVTec AD ({category})") as progress,
    ):
        progress_stream = _ProgressReader(response, progress)
        found = False
        with tarfile.open(fileobj=progress_stream, mode="r|xz") as archive:
            for member in archive:
                if member.name.split("/")[0] == category:
                    archive.extract(member, staging, filter="data")
                    found = True
        if not found:
            raise StpmError(f"the MVTec AD archive has no category {category!r}")
        shutil.move(str(Path(staging) / category), target)
    return target


class _ProgressReader:
    """A file-like wrapper that advances a progress bar as bytes are read."""

    def __init__(self, stream, progress: tqdm) -> None:
        self.stream, self.progress = stream, progress

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.progress.update(len(chunk))
        return chunk
