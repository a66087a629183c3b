"""Overlays before and after a change, side by side: the README's docs/overlays_before_after.png.

Usage:
    python scripts/overlay_figure.py OUT.png --before DIR --after DIR \
        "crack, flagged with its image term=test_crack_exp6_num_249821_overlay.png" ...

DIR holds what `stpm-predict` wrote (`<stem>_overlay.png`), once by the older version (--before,
e.g. from a checkout of it: `PYTHONPATH=OLD python -c "from stpm.cli import predict_main; ..."`)
and once by this one (--after), on the same images and models. Each TITLE=FILE names one
overlay, found under both folders; a column per overlay, before above, after below, at their
own sizes.

docs/overlays_before_after.png was made from the default model's FP32 export on seven Magnetic
Tile test images, and from a model of scripts/colour_category.py's colour tissue category
(`stpm-train --data DIR --image-size 128 --epochs 30`) on two of its test images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("rows", nargs="+", metavar="TITLE=FILE")
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    args = parser.parse_args()
    from matplotlib.figure import Figure

    columns = [row.split("=", 1) for row in args.rows]
    pictures = [
        [_read(folder / name) for _, name in columns] for folder in (args.before, args.after)
    ]
    widths = [max(before.shape[1], after.shape[1]) for before, after in zip(*pictures, strict=True)]
    heights = [max(picture.shape[0] for picture in row) for row in pictures]
    inches = sum(widths) / 100 + 0.1 * len(columns), sum(heights) / 100 + 0.8
    figure = Figure(figsize=inches, dpi=100)
    axes = figure.subplots(
        2, len(columns), squeeze=False, gridspec_kw={"width_ratios": widths, "wspace": 0.05}
    )
    for row, (when, row_axes) in enumerate(zip(("before", "after"), axes, strict=True)):
        for (title, _), picture, axis in zip(columns, pictures[row], row_axes, strict=True):
            axis.imshow(picture)
            axis.set_title(f"{title}\n{when}" if row == 0 else when, fontsize=8)
            axis.set_axis_off()
    figure.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, hspace=0.08)
    figure.savefig(args.out, format="png")
    print(f"wrote {args.out}")


def _read(path: Path):
    picture = cv2.imread(str(path))
    if picture is None:
        raise SystemExit(f"cannot read {path}")
    return picture[..., ::-1]


if __name__ == "__main__":
    main()
