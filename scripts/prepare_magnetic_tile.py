"""Turn the Magnetic Tile defect dataset into an MVTec-style category folder.

Usage: python scripts/prepare_magnetic_tile.py SOURCE OUT

SOURCE holds MT_<Type>/Imgs/<name>.jpg with masks <name>.png (the published layout).
The split is the project's fixed benchmark split (see SOURCE.md beside the data):
MT_Free sorted by file name, every 5th image (index 0, 5, 10, ...) goes to test/good,
the rest to train/good; every defect image goes to test/<type>/ with its mask at
ground_truth/<type>/<name>_mask.png. Files are copied unchanged.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DEFECT_FREE = "MT_Free"
TEST_EVERY = 5


def _images(folder: Path) -> list[Path]:
    return sorted((folder / "Imgs").glob("*.jpg"), key=lambda p: p.name)


def prepare(source: Path, out: Path) -> dict[str, int]:
    """Copy SOURCE into OUT by the fixed split; returns the number of images per folder."""
    free = _images(source / DEFECT_FREE)
    if not free:
        raise SystemExit(
            f"error: no images in {source / DEFECT_FREE / 'Imgs'}; is {source} the dataset?"
        )
    counts: dict[str, int] = {}

    def copy(src: Path, dst: Path, key: str) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        counts[key] = counts.get(key, 0) + 1

    for index, image in enumerate(free):
        split = "test/good" if index % TEST_EVERY == 0 else "train/good"
        copy(image, out / split / image.name, split)
    for folder in sorted(source.glob("MT_*")):
        if folder.name == DEFECT_FREE:
            continue
        defect = folder.name.removeprefix("MT_").lower()
        for image in _images(folder):
            mask = image.with_suffix(".png")
            if not mask.is_file():
                raise SystemExit(f"error: mask missing for {image}")
            copy(image, out / "test" / defect / image.name, f"test/{defect}")
            copy(
                mask,
                out / "ground_truth" / defect / f"{image.stem}_mask.png",
                f"ground_truth/{defect}",
            )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the dataset as published (MT_*/Imgs)")
    parser.add_argument("out", type=Path, help="the category folder to write")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        print(f"error: {args.source} is not a folder", file=sys.stderr)
        return 2
    counts = prepare(args.source, args.out)
    for key, count in sorted(counts.items()):
        print(f"{key:28s} {count:5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
