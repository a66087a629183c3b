"""MVTec-style folders: their images, checks before training, and the download.

Folder layout (MVTec AD): <category>/train/good/*.png, <category>/test/<defect>/*.png,
<category>/ground_truth/<defect>/<name>_mask.png. Masks are optional for test/good. How one image
is decoded and resized is stpm.scoring's (the one scoring path); load_resized applies it to many.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import distributed, scoring
from .errors import StpmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DATA_ROOT_VARIABLE = "STPM_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("data/mvtec_ad")
# The dataset's official archive (all 15 categories, about 4.9 GB); only the asked-for category
# is extracted from the stream.
MVTEC_AD_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)


# ----------------------------------------------------------------------------- images


def load_resized(
    paths: Sequence[Path], size: tuple[int, int], desc: str = "loading", mode: str = "squash"
) -> np.ndarray:
    """Decode and resize every image once, as scoring does (scoring.resize by mode): uint8
    (N, H, W, 3).

    Training has no random augmentation, so this cache is exact and spares a decode per epoch.
    """
    batch = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    failures = []
    for index, path in enumerate(
        tqdm(paths, desc=desc, unit="img", leave=False, disable=distributed.secondary())
    ):
        try:
            batch[index] = scoring.resize(scoring.read_image(path), size, mode)
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
        if sample.mask is not None and scoring.image_shape(sample.mask) != scoring.image_shape(
            sample.path
        ):
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
