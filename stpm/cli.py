"""Command-line entry points: thin wrappers over the STPM estimator.

A user's mistake is printed as one line and exits with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from . import data, distributed, outputs, runs, runtime, settings
from .detector import STPM
from .errors import StpmError


def _friendly(command: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn StpmError into one line on stderr and exit status 2; Ctrl-C into status 130."""

    @functools.wraps(command)
    def run(argv: list[str] | None = None) -> int:
        name = command.__name__.removesuffix("_main").replace("_", "-")

        def one_line(message, category, *args, **kwargs) -> None:
            print(f"stpm-{name}: warning: {message}", file=sys.stderr)

        try:
            with warnings.catch_warnings():
                warnings.showwarning = one_line
                return command(argv)
        except StpmError as error:
            if distributed.secondary():  # rank 0 prints what every rank found
                if not isinstance(error, distributed.EveryRankError):
                    print(
                        f"stpm-{name}: rank {os.environ['RANK']}: error: {error}", file=sys.stderr
                    )
                return 2
            print(f"stpm-{name}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"stpm-{name}: interrupted", file=sys.stderr)
            return 130
        finally:
            distributed.leave()

    return run


def _add_data_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    group = parser.add_argument_group("data")
    if several:
        group.add_argument(
            "--category",
            nargs="+",
            help="category name(s) under the data root, e.g. bottle; several train one "
            "after another into --out/<category>",
        )
        group.add_argument(
            "--all-categories",
            action="store_true",
            help="every category under the data root (folders with train/good)",
        )
    else:
        group.add_argument("--category", help="category name under the data root, e.g. bottle")
    group.add_argument("--data", type=Path, help="an MVTec-style category folder (any path)")
    group.add_argument(
        "--data-root",
        type=Path,
        help=f"where categories live (default: ${data.DATA_ROOT_VARIABLE} or {data.DEFAULT_DATA_ROOT})",
    )


def _train_parser() -> argparse.ArgumentParser:
    defaults = STPM().get_params()
    parser = argparse.ArgumentParser(
        prog="stpm-train",
        description="Train an STPM anomaly detector on the defect-free images of one category.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_arguments(parser, several=True)
    parser.add_argument(
        "--download", action="store_true", help="fetch the MVTec AD category first if missing"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run where it stopped",
    )
    _add_model_arguments(parser.add_argument_group("model"), defaults)
    _add_training_arguments(parser.add_argument_group("training"), defaults)
    threshold = parser.add_argument_group("threshold")
    threshold.add_argument(
        "--max-false-alarms",
        type=float,
        metavar="SHARE",
        help="set the threshold so that this share of defect-free validation images is "
        "rejected, e.g. 0.01 (default: mean + 3 std of their scores)",
    )
    threshold.add_argument(
        "--defects",
        type=Path,
        metavar="DIR",
        help="defective images in hand: report what share of them the threshold catches",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="run folder (default: runs/<category>/<timestamp>); with several categories the "
        f"folder that holds one run per category (default: {runs.CATEGORY_RUNS})",
    )
    return parser


def _add_model_arguments(model: argparse._ArgumentGroup, defaults: dict) -> None:
    model.add_argument("--backbone", default=defaults["backbone"], help="any timm CNN")
    model.add_argument(
        "--student",
        default=defaults["student"],
        help="the student's architecture: 'same' (the teacher's), 'slim' (Lite0 at half its "
        "channels) or a timm CNN name; levels of another width get 1x1 projections",
    )
    model.add_argument(
        "--teacher-weights", type=Path, help="a timm state dict for the teacher (offline use)"
    )
    model.add_argument("--strides", type=int, nargs="+", default=list(defaults["strides"]))
    model.add_argument(
        "--image-size", type=int, nargs="+", default=[defaults["image_size"]], help="SIDE or H W"
    )
    model.add_argument(
        "--resize",
        choices=settings.RESIZE_MODES,
        default=defaults["resize_mode"],
        help="images of another shape: stretched to the size, or aspect kept and padded",
    )
    model.add_argument("--combine", choices=settings.COMBINES, default=defaults["combine"])
    model.add_argument("--smoothing-sigma", type=float, default=defaults["smoothing_sigma"])
    model.add_argument(
        "--image-model",
        choices=[*settings.IMAGE_MODELS, "none"],
        default=defaults["image_model"] or "none",
        help="'gaussian': add an image-level term to each score, a Gaussian of the teacher's "
        "pooled features (sees large-area changes the map normalises away)",
    )
    model.add_argument(
        "--share-stem",
        action="store_true",
        help="the student reuses the teacher's frozen stem (EfficientNet-Lite students)",
    )
    model.add_argument(
        "--distance",
        choices=settings.DISTANCES,
        default=defaults["distance"],
        help="compare features by cosine (the paper) or by squared error of per-channel "
        "standardized features (keeps magnitude: large-area brightness changes)",
    )


def _add_training_arguments(training: argparse._ArgumentGroup, defaults: dict) -> None:
    training.add_argument(
        "--epochs",
        type=int,
        help=f"{defaults['epochs']} for a new run; with --resume, train that run longer",
    )
    training.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    training.add_argument("--lr", type=float, default=defaults["learning_rate"])
    training.add_argument("--momentum", type=float, default=defaults["momentum"])
    training.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    training.add_argument(
        "--validation-fraction",
        type=float,
        default=defaults["validation_fraction"],
        help="share of train/good held out for model selection and the threshold",
    )
    training.add_argument("--seed", type=int, default=defaults["seed"])
    training.add_argument(
        "--denoise",
        type=float,
        default=defaults["denoise"],
        metavar="SHARE",
        help="share of training images the student sees with a synthetic defect while it "
        "learns the teacher's features of the clean image",
    )
    training.add_argument(
        "--hard-quantile",
        type=_float_or_none,
        default=defaults["hard_quantile"],
        help="average only the distances at or above this quantile of a batch's; "
        "'none' for the paper's plain mean",
    )
    training.add_argument(
        "--selection",
        choices=settings.SELECTIONS,
        default=defaults["selection"],
        help="keep the epoch of lowest validation loss, or the one that best separates "
        "validation images from synthetic defects made of them",
    )
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    training.add_argument("--threads", type=int, help="CPU threads (default: torch's own)")


def _float_or_none(text: str) -> float | None:
    """argparse type: a number, or 'none'."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', not {text!r}") from None


@_friendly
def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    if args.resume:
        return _report_training(STPM.resume(args.resume, args.epochs), args.resume, args.defects)
    if len(args.image_size) not in (1, 2):
        raise StpmError("--image-size takes one side or two (height width)")
    if args.defects is not None and not (args.defects.is_dir() and data.list_images(args.defects)):
        raise StpmError(f"--defects: no images in {args.defects} (a folder of defective parts)")
    names = args.category or []
    if args.all_categories:
        if names or args.data:
            raise StpmError("--all-categories takes every category; give no --category or --data")
        names = data.categories(data.data_root(args.data_root))
    if len(names) > 1 or args.all_categories:
        return _train_categories(args, names)
    folder = _category_folder(args, names[0] if names else None)
    run_dir = args.out or runs.new_run_dir(folder.name)
    detector = _estimator(args).fit(folder, run_dir=run_dir)
    return _report_training(detector, run_dir, args.defects)


def _category_folder(args: argparse.Namespace, category: str | None) -> Path:
    """--data, or the category under the data root (downloaded first with --download)."""
    folder = data.category_dir(category, args.data, args.data_root)
    if args.download and not folder.is_dir():
        if not category:
            raise StpmError("--download needs --category (an MVTec AD category name)")
        folder = data.download_mvtec_category(category, data.data_root(args.data_root))
    return folder


def _train_categories(args: argparse.Namespace, names: list[str]) -> int:
    """One run per category in --out/<category>, one after another: a finished run (its
    model.pt written) is skipped, an interrupted one (a checkpoint, no model.pt) resumed, so
    the same command picks up where a crash or a cluster's time limit stopped it."""
    if args.data is not None:
        raise StpmError("--data names one category folder; use --category NAME ... instead")
    if len(set(names)) < len(names):
        raise StpmError(f"a category is named twice: {' '.join(names)}")
    root, outcomes, world = args.out or runs.CATEGORY_RUNS, {}, distributed.join()
    for number, name in enumerate(names, 1):
        run_dir = root / name
        _say(f"[{number}/{len(names)}] {name}: ", end="", flush=True)
        # what rank 0 sees decides for every rank: the run folder may be on its machine alone
        state = distributed.from_main(lambda run_dir=run_dir: runs.run_state(run_dir), world)
        try:
            if state == "finished":
                _say(f"finished before, skipped ({run_dir})")
                outcomes[name] = "skipped"
                continue
            if state == "interrupted":
                _say(f"resuming {run_dir}")
                detector = STPM.resume(run_dir, args.epochs)
                outcomes[name] = "resumed"
            else:
                _say(f"training into {run_dir}")
                detector = _estimator(args).fit(_category_folder(args, name), run_dir=run_dir)
                outcomes[name] = "trained"
            _report_training(detector, run_dir, args.defects)
        except StpmError as error:  # one bad category does not stop the others
            _say(f"stpm-train: error: {name}: {error}", file=sys.stderr)
            outcomes[name] = f"failed: {error}"
    failed = [name for name, outcome in outcomes.items() if outcome.startswith("failed")]
    _say(
        f"{len(names)} categories: "
        + ", ".join(
            f"{sum(o.startswith(kind) for o in outcomes.values())} {kind}"
            for kind in ("trained", "resumed", "skipped", "failed")
        )
        + (f" ({' '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


def _estimator(args: argparse.Namespace) -> STPM:
    """An untrained STPM with the command line's settings."""
    return STPM(
        backbone=args.backbone,
        strides=args.strides,
        image_size=args.image_size[0] if len(args.image_size) == 1 else args.image_size,
        resize_mode=args.resize,
        combine=args.combine,
        smoothing_sigma=args.smoothing_sigma,
        distance=args.distance,
        image_model=None if args.image_model == "none" else args.image_model,
        student=args.student,
        share_stem=args.share_stem,
        epochs=args.epochs or STPM().epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        denoise=args.denoise,
        hard_quantile=args.hard_quantile,
        selection=args.selection,
        teacher_weights=str(args.teacher_weights) if args.teacher_weights else None,
        device=args.device,
        threads=args.threads,
        max_false_alarms=args.max_false_alarms,
    )


def _say(*args, **kwargs) -> None:
    """print, in rank 0 only under torchrun: one copy of each line, not one per process."""
    if not distributed.secondary():
        print(*args, **kwargs)


def _report_training(detector: STPM, run_dir: Path, defects: Path | None = None) -> int:
    if distributed.secondary():
        return 0
    last = detector.history_[-1]
    print(
        f"trained {detector.backbone} on {detector.train_images_} images in "
        f"{detector.training_seconds_:.0f} s; final loss {last['loss']:.4f}, "
        f"kept epoch {detector.best_epoch_}; threshold {detector.threshold_} "
        f"({detector.describe().validation['threshold_rule']} of the validation scores)"
    )
    if defects is not None and detector.threshold_ is not None:
        outcomes = [outcome for _, outcome in detector.predict_iter(data.list_images(defects))]
        caught = sum(getattr(outcome, "is_anomalous", False) for outcome in outcomes)
        unreadable = sum(isinstance(outcome, StpmError) for outcome in outcomes)
        scored = len(outcomes) - unreadable
        print(
            f"the threshold catches {caught} of the {scored} defective images in {defects}"
            + (f" ({caught / scored:.0%})" if scored else "")
            + (f"; {unreadable} could not be read" if unreadable else "")
        )
    print(f"run folder: {run_dir}")
    return 0


# ---------------------------------------------------------------------- stpm-predict


def _predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpm-predict",
        description="Score images with a trained model: heatmap overlays, masks and a CSV.",
    )
    parser.add_argument(
        "inputs", nargs="+", help="image files, folders (searched recursively), globs"
    )
    parser.add_argument("--model", type=Path, help="model file (default: newest runs/**/model.pt)")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument(
        "--threshold", type=float, help="raw-score threshold (default: the model's)"
    )
    parser.add_argument(
        "--max-false-alarms",
        type=float,
        metavar="SHARE",
        help="instead of --threshold: the quantile of the model's defect-free validation scores "
        "that rejects this share of them, e.g. 0.01",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--save-maps", action="store_true", help="also write <stem>_map.npy")
    parser.add_argument("--no-images", action="store_true", help="CSV and summary only")
    _add_runtime_arguments(parser)
    return parser


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--runtime",
        choices=runtime.RUNTIMES,
        default="auto",
        help="auto: torch for .pt, ONNX Runtime for .onnx; openvino runs .onnx files",
    )
    group.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads (default: this process's physical cores, at most "
        f"{runtime.MAX_DEFAULT_THREADS}; torch: its own default)",
    )
    group.add_argument(
        "--precision",
        choices=runtime.PRECISIONS,
        default="f32",
        help="OpenVINO's arithmetic (bf16 is faster on CPUs with BF16 units, maps move slightly)",
    )
    group.add_argument("--device", default="auto", help="torch: auto, cpu, cuda or cuda:N")
    group.add_argument("--teacher-weights", type=Path, help="the teacher file the model used")
    group.add_argument("--force", action="store_true", help="load even if the teacher differs")


def _load(
    args: argparse.Namespace, world: distributed.World = distributed.ALONE
) -> tuple[STPM, Path]:
    """The model of --model (or the newest run) and its path, with the runtime options applied.

    Under torchrun the processes on one machine share its cores (by default each takes its
    share of the threads one process would) and each takes its own GPU, if any."""
    path = args.model or runs.latest_model()
    if args.threads is not None and args.threads < 1:
        raise StpmError(f"--threads must be at least 1, not {args.threads}")
    threads, device = getattr(args, "threads", None), args.device
    if world.distributed:
        threads = threads or max(1, runtime.default_threads() // world.local_size)
        device = str(distributed.local_device(runtime.resolve_device(device), world))
    detector = STPM.load(
        path,
        runtime=getattr(args, "runtime", "auto"),
        threads=threads,
        device=device,
        precision=getattr(args, "precision", "f32"),
        teacher_weights=str(args.teacher_weights) if args.teacher_weights else None,
        force=args.force,
    )
    return detector, path


@_friendly
def predict_main(argv: list[str] | None = None) -> int:
    args = _predict_parser().parse_args(argv)
    if args.threshold is not None and args.max_false_alarms is not None:
        raise StpmError("give --threshold or --max-false-alarms, not both")
    world = distributed.join()
    detector, model_path = distributed.check_everywhere(lambda: _load(args, world), world)
    threshold = args.threshold
    if args.max_false_alarms is not None:
        threshold = detector.threshold_at(args.max_false_alarms)
    result = outputs.score_files(
        detector,
        args.inputs,
        args.out,
        threshold=threshold,
        batch_size=args.batch_size,
        save_maps=args.save_maps,
        images=not args.no_images,
        world=world,
    )
    if not world.main:
        return 1 if result.failures else 0
    outputs.write_summary(result, args.out, model=str(model_path))
    _print_table(result.rows, result.summary)
    for row in result.failures:
        print(f"stpm-predict: error: {row['error']}", file=sys.stderr)
    return 1 if result.failures else 0


def _print_table(rows: list[dict], summary: dict, limit: int = 10) -> None:
    scored = sorted((row for row in rows if row["score"]), key=lambda row: -float(row["score"]))
    if scored:
        width = min(60, max(len(row["path"]) for row in scored[:limit]))
        print(f"{'image':{width}s}  {'score':>10s}  {'normalised':>10s}  verdict")
        for row in scored[:limit]:
            name = row["path"] if len(row["path"]) <= width else "..." + row["path"][-width + 3 :]
            print(
                f"{name:{width}s}  {float(row['score']):10.4g}  {float(row['normalized_score']):10.2f}  {row['verdict']}"
            )
        if len(scored) > limit:
            print(f"... {len(scored) - limit} more in predictions.csv (highest scores shown)")
    print(
        f"{summary['images']} images: {summary['anomalous']} anomalous, {summary['good']} good, "
        f"{summary['failed']} failed; threshold {summary['threshold']:.4g}; outputs in {summary['outputs']}"
    )


# ---------------------------------------------------------------------- stpm-eval


@_friendly
def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stpm-eval",
        description="Image AUROC, pixel AUROC, PRO and F1-max on a category's test/ set, with a report.",
    )
    parser.add_argument("--model", type=Path, help="model file (default: newest runs/**/model.pt)")
    _add_data_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder")
    parser.add_argument("--batch-size", type=int, default=16)
    _add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    from .evaluation import evaluate, format_table, write_report

    world = distributed.join()
    detector, _ = distributed.check_everywhere(lambda: _load(args, world), world)
    folder = data.category_dir(args.category, args.data, args.data_root)
    if not folder.is_dir():
        raise StpmError(f"no such folder: {folder}")
    evaluation = evaluate(detector, folder, batch_size=args.batch_size, world=world)
    if evaluation is None:  # a rank other than 0: its scores went to rank 0
        return 0
    write_report(evaluation, detector.threshold_, args.out)
    print(format_table(evaluation.metrics))
    if not evaluation.has_masks:
        print(
            f"pixel AUROC and PRO need defect masks ({folder / 'ground_truth'}/<defect>/"
            "<name>_mask.png); written as null"
        )
    print(f"report: {args.out / 'report.md'}")
    return 0


# ---------------------------------------------------------------------- stpm-export


@_friendly
def export_main(argv: list[str] | None = None) -> int:
    args = _export_parser().parse_args(argv)
    from . import export

    model_path = args.model or runs.latest_model()
    if model_path.suffix.lower() == ".onnx":
        raise StpmError(f"{model_path} is already an ONNX file; export the .pt it came from")
    args.threads = None
    detector, _ = _load(args)
    folder = _export_data(args, model_path)
    suffix = "-int8.onnx" if args.int8 else ".onnx"
    out = args.out or model_path.with_name(model_path.stem + suffix)
    reduce_range = {"auto": None, "on": True, "off": False}[args.reduce_range]
    exported = export.export_model(
        detector.runtime_, out, folder, args.int8, args.images, reduce_range
    )
    if args.int8:
        print(
            f"INT8 (reduce_range {exported.int8['reduce_range']}): image term and "
            f"threshold fitted on its own features; threshold "
            f"{exported.threshold_before:.4g} -> {exported.threshold:.4g}"
        )
    check = exported.check
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB). ONNX Runtime vs torch on "
        f"{check['images']} train/good images of {folder}: max |map difference| "
        f"{check['max_abs_map_difference']:.2g}, max |score difference| "
        f"{check['max_abs_score_difference']:.2g} (largest score {check['largest_score']:.3g}), "
        f"map correlation {check['map_correlation']:.4f}"
    )
    return 0


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpm-export",
        description="Export a model to one ONNX graph (image -> anomaly map and score) for ONNX "
        "Runtime or OpenVINO, FP32 or INT8, checked against the torch model on defect-free images.",
    )
    parser.add_argument("--model", type=Path, help="model file (default: newest runs/**/model.pt)")
    _add_data_arguments(parser)
    parser.add_argument("--out", type=Path, help="ONNX file (default: beside the model)")
    parser.add_argument(
        "--int8", action="store_true", help="static INT8, calibrated on train/good images"
    )
    parser.add_argument(
        "--images", type=int, default=64, help="train/good images to calibrate and compare on"
    )
    parser.add_argument(
        "--reduce-range",
        choices=["auto", "on", "off"],
        default="auto",
        help="INT8: 7-bit weights, for CPUs without VNNI (whose 8-bit arithmetic saturates); "
        "auto: what this CPU needs. Export on the kind of CPU that will run the file",
    )
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-weights", type=Path, help="the teacher file the model used")
    parser.add_argument("--force", action="store_true", help="load even if the teacher differs")
    return parser


# ---------------------------------------------------------------------- stpm-compress


@_friendly
def compress_main(argv: list[str] | None = None) -> int:
    args = _compress_parser().parse_args(argv)

    model_path = args.run / "model.pt" if args.run.is_dir() else args.run
    if not model_path.is_file():
        raise StpmError(f"no model file at {model_path} (give a run folder or its model.pt)")
    if args.epochs < 1:
        raise StpmError("--epochs must be at least 1")
    folder = _export_data(args, model_path)
    suffix = (f"-prune{round(100 * args.prune)}" if args.prune else "") + (
        "-shared-stem" if args.share_stem else ""
    )
    run_dir = args.out or model_path.parent.with_name(model_path.parent.name + suffix)
    from . import compress

    detector = compress.compress(
        model_path,
        folder,
        args.prune,
        args.share_stem,
        args.epochs,
        args.lr,
        run_dir,
        args.device,
        args.seed,
    )
    if detector.pruning_ and args.prune:
        before, after = (
            detector.pruning_["parameters_before"],
            detector.pruning_["parameters_after"],
        )
        print(f"student: {before:,} -> {after:,} parameters ({after / before:.0%})")
    if detector.shared_layers_:
        print(f"shared with the teacher: {', '.join(detector.shared_layers_)}")
    return _report_training(detector, run_dir)


def _compress_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpm-compress",
        description="Make a trained model's student smaller (structured pruning, a stem shared "
        "with the teacher) and fine-tune it by distillation; writes a new run folder. Export it "
        "with stpm-export --int8 for the compact INT8 model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="a run folder (or its model.pt)")
    _add_data_arguments(parser)
    parser.add_argument(
        "--prune", type=float, help="share of each block's expansion channels to remove, e.g. 0.5"
    )
    parser.add_argument(
        "--share-stem", action="store_true", help="the student reuses the teacher's frozen stem"
    )
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the run's)")
    parser.add_argument(
        "--seed",
        type=int,
        help="fine-tuning seed; it also picks the validation images (default: the run's)",
    )
    parser.add_argument("--out", type=Path, help="new run folder (default: beside RUN_DIR)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def _export_data(args: argparse.Namespace, model_path: Path) -> Path:
    """--data / --category if given, else the data folder the run's config.json records."""
    if args.data is not None or args.category:
        return data.category_dir(args.category, args.data, args.data_root)
    return runs.recorded_data(model_path)
