"""Command-line entry points: thin wrappers over the STPM estimator.

A user's mistake is printed as one line and exits with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from . import data
from .detector import STPM
from .errors import StpmError


def _friendly(command: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn StpmError into one line on stderr and exit status 2; Ctrl-C into status 130."""

    @functools.wraps(command)
    def run(argv: list[str] | None = None) -> int:
        name = command.__name__.removesuffix("_main").replace("_", "-")
        try:
            return command(argv)
        except StpmError as error:
            print(f"stpm-{name}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"stpm-{name}: interrupted", file=sys.stderr)
            return 130

    return run


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--category", help="category name under the data root, e.g. bottle")
    group.add_argument("--data", type=Path, help="an MVTec-style category folder (any path)")
    group.add_argument(
        "--data-root",
        type=Path,
        help=f"where categories live (default: ${data.DATA_ROOT_VARIABLE} or {data.DEFAULT_DATA_ROOT})",
    )


def _train_parser() -> argparse.ArgumentParser:
    defaults = STPM()
    settings = defaults.settings
    parser = argparse.ArgumentParser(
        prog="stpm-train",
        description="Train an STPM anomaly detector on the defect-free images of one category.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_arguments(parser)
    parser.add_argument(
        "--download", action="store_true", help="fetch the MVTec AD category first if missing"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default=defaults.backbone, help="any timm CNN")
    model.add_argument(
        "--teacher-weights", type=Path, help="a timm state dict for the teacher (offline use)"
    )
    model.add_argument("--strides", type=int, nargs="+", default=list(defaults.strides))
    model.add_argument(
        "--image-size", type=int, nargs="+", default=[defaults.image_size], help="SIDE or H W"
    )
    model.add_argument("--combine", choices=["product", "sum"], default=defaults.combine)
    model.add_argument("--smoothing-sigma", type=float, default=defaults.smoothing_sigma)
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=settings.epochs)
    training.add_argument("--batch-size", type=int, default=settings.batch_size)
    training.add_argument("--lr", type=float, default=settings.learning_rate)
    training.add_argument("--momentum", type=float, default=settings.momentum)
    training.add_argument("--weight-decay", type=float, default=settings.weight_decay)
    training.add_argument(
        "--validation-fraction", type=float, default=settings.validation_fraction,
        help="share of train/good held out for model selection and the threshold",
    )
    training.add_argument("--seed", type=int, default=settings.seed)
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--out", type=Path, help="run folder (default: runs/<category>/<timestamp>)"
    )
    return parser


@_friendly
def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    folder = data.category_dir(args.category, args.data, args.data_root)
    if args.download and not folder.is_dir():
        if not args.category:
            raise StpmError("--download needs --category (an MVTec AD category name)")
        folder = data.download_mvtec_category(args.category, data.data_root(args.data_root))
    if len(args.image_size) not in (1, 2):
        raise StpmError("--image-size takes one side or two (height width)")
    run_dir = args.out or _new_run_dir(folder.name)
    detector = STPM(
        backbone=args.backbone,
        strides=args.strides,
        image_size=args.image_size[0] if len(args.image_size) == 1 else args.image_size,
        combine=args.combine,
        smoothing_sigma=args.smoothing_sigma,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        teacher_weights=str(args.teacher_weights) if args.teacher_weights else None,
        device=args.device,
    ).fit(folder, run_dir=run_dir)
    last = detector.history_[-1]
    print(
        f"trained {detector.backbone} on {detector.train_images_} images in "
        f"{detector.training_seconds_:.0f} s; final loss {last['loss']:.4f}, "
        f"kept epoch {detector.best_epoch_}; threshold {detector.threshold_}"
    )
    print(f"run folder: {run_dir}")
    return 0


def _new_run_dir(category: str) -> Path:
    base = Path("runs") / category / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    return run_dir


