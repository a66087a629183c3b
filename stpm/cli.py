"""Command-line entry points: thin wrappers over the STPM estimator.

A user's mistake is printed as one line, `stpm-<command>: error: <what, and the fix>`, and exits
with status 2; nothing else is caught. Every flag's help ends with its default (_Help).
stpm-train's model and training flags come from stpm.settings.SETTINGS.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from . import data, distributed, outputs, runs, runtime, settings
from .detector import STPM
from .errors import StpmError


class _Help(argparse.HelpFormatter):
    """One style for every command: each flag's help ends with its default, once."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or text == argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            return text
        return f"{text} (default: {_shown(action.default)})"


def _shown(default) -> str:
    """A default as a user would type it."""
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list | tuple):
        return " ".join(map(str, default))
    return str(default)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Help)


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
        except KeyboardInterrupt as interrupt:  # its message, if any: how to go on
            hint = f"; {interrupt}" if str(interrupt) else ""
            if not distributed.secondary():
                print(f"stpm-{name}: interrupted{hint}", file=sys.stderr)
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
        help="where categories live "
        f"(default: ${data.DATA_ROOT_VARIABLE}, else {data.DEFAULT_DATA_ROOT})",
    )


def _train_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "stpm-train", "Train an STPM anomaly detector on the defect-free images of one category."
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
    groups = {name: parser.add_argument_group(name) for name in ("model", "training")}
    groups["threshold"] = parser.add_argument_group("threshold")
    for setting in settings.SETTINGS:
        _add_setting(groups[setting.group], setting)
    groups["threshold"].add_argument(
        "--defects",
        type=Path,
        metavar="DIR",
        help="defective images in hand: report what share of them the threshold catches",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="run folder (default: runs/<category>/<timestamp>; with several categories the "
        f"folder of one run per category, {runs.CATEGORY_RUNS})",
    )
    return parser


def _add_setting(group: argparse._ArgumentGroup, setting: settings.Setting) -> None:
    """A setting's flag: its type, choices and default from stpm.settings.SETTINGS."""
    text = setting.help + (f" (default: {setting.default_text})" if setting.default_text else "")
    if setting.kind is bool:
        group.add_argument(setting.flag, dest=setting.name, action="store_true", help=text)
        return
    default = setting.default
    if setting.many:
        default = list(default) if isinstance(default, list | tuple) else [default]
    if setting.name == "epochs":  # with --resume, absent means the run's own
        default, text = None, f"{text} (default: {setting.default}; with --resume, the run's)"
    group.add_argument(
        setting.flag,
        dest=setting.name,
        type=setting.kind,
        default=default,
        choices=setting.choices,
        nargs="+" if setting.many else None,
        metavar=setting.metavar
        or (None if setting.choices else setting.flag[2:].upper().replace("-", "_")),
        help=text,
    )


@_friendly
def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    if args.resume:
        with _resume_hint(args.resume):
            detector = STPM.resume(args.resume, args.epochs)
        return _report_training(detector, args.resume, args.defects)
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
    with _resume_hint(run_dir):
        detector = _estimator(args).fit(folder, run_dir=run_dir)
    return _report_training(detector, run_dir, args.defects)


@contextlib.contextmanager
def _resume_hint(run_dir: Path):
    """Ctrl-C during training: say how to go on from the last epoch saved."""
    try:
        yield
    except KeyboardInterrupt:
        if (run_dir / runs.CHECKPOINT).is_file():
            raise KeyboardInterrupt(f"continue with: stpm-train --resume {run_dir}") from None
        raise KeyboardInterrupt("no epoch had finished, nothing to resume") from None


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
    with _interrupted_categories():
        _each_category(args, names, root, outcomes, world)
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


@contextlib.contextmanager
def _interrupted_categories():
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            "the same command goes on where it stopped (finished runs skipped, the interrupted "
            "one resumed)"
        ) from None


def _each_category(
    args: argparse.Namespace,
    names: list[str],
    root: Path,
    outcomes: dict,
    world: distributed.World,
) -> None:
    """Each category's run in turn, its outcome in outcomes."""
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


def _estimator(args: argparse.Namespace) -> STPM:
    """An untrained STPM with the command line's settings (each flag's dest is its setting)."""
    params = {setting.name: getattr(args, setting.name) for setting in settings.SETTINGS}
    sides = params["image_size"]
    params["image_size"] = sides[0] if len(sides) == 1 else sides
    params["epochs"] = params["epochs"] or settings.BY_NAME["epochs"].default
    return STPM(**params)


def _say(*args, **kwargs) -> None:
    """print, in rank 0 only under torchrun: one copy of each line, not one per process."""
    if not distributed.secondary():
        print(*args, **kwargs)


def _report_training(detector: STPM, run_dir: Path, defects: Path | None = None) -> int:
    if distributed.secondary():
        return 0
    last, rule = detector.history_[-1], detector.describe().validation["threshold_rule"]
    threshold = "no threshold: fewer than 2 validation images (raise --validation-fraction)"
    if detector.threshold_ is not None:
        threshold = f"threshold {detector.threshold_:.4g} ({rule} of the validation scores)"
    print(
        f"trained {_student(detector)} on {detector.train_images_} images in "
        f"{detector.training_seconds_:.0f} s; final loss {last['loss']:.4f}, "
        f"kept epoch {detector.best_epoch_}; {threshold}"
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


def _student(detector: STPM) -> str:
    """What was trained, in words: the student and its teacher."""
    kind, teacher = detector.student, detector.backbone
    if kind == "slim":
        return f"a slim student (half the width) of the {teacher} teacher"
    if kind == "same":
        return f"a student of the {teacher} teacher's architecture"
    return f"a {kind} student of the {teacher} teacher"


# ---------------------------------------------------------------------- stpm-predict


def _predict_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "stpm-predict", "Score images with a trained model: heatmap overlays, masks and a CSV."
    )
    parser.add_argument(
        "inputs", nargs="+", help="image files, folders (searched recursively), globs"
    )
    _add_model_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument(
        "--threshold", type=float, help="raw-score threshold (default: the model's)"
    )
    parser.add_argument(
        "--max-false-alarms",
        type=float,
        metavar="SHARE",
        help="instead of --threshold: the quantile of the model's defect-free validation scores "
        "that rejects this share of them, e.g. 0.01 (default: the model's threshold)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per call to the model")
    parser.add_argument("--save-maps", action="store_true", help="also write <stem>_map.npy")
    parser.add_argument("--no-images", action="store_true", help="CSV and summary only")
    _add_record_arguments(parser)
    _add_runtime_arguments(parser)
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, help=f"model file (default: the newest {runs.RUNS}/**/model.pt)"
    )


@_friendly
def review_main(argv: list[str] | None = None) -> int:
    parser = _parser("stpm-review", "Serve the line's page, read-only, over a record folder.")
    parser.add_argument("record", type=Path, help="the record folder (stpm-serve --record)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0: all of them)")
    parser.add_argument("--port", type=int, default=8001, help="TCP port")
    parser.add_argument("--token-file", type=Path, help="file holding the token to read with")
    parser.add_argument(
        "--shifts", metavar="HH:MM,...", help="shift start times (default: calendar days)"
    )
    args = parser.parse_args(argv)
    import uvicorn

    from . import serve
    from .record import Record, Shifts

    kept = Record(args.record, Shifts.parse(args.shifts), read_only=True)
    app = serve.create_review_app(kept, serve.read_token(args.token_file))
    print(f"stpm-review: {args.record} on http://{args.host}:{args.port}/")
    serve.configure_logging()
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


@_friendly
def watch_main(argv: list[str] | None = None) -> int:
    args = _watch_parser().parse_args(argv)
    if importlib.util.find_spec("watchdog") is None:
        raise StpmError("stpm-watch needs watchdog: pip install 'stpm[watch]'")
    from .service import named_identity
    from .watch import Watcher

    if not args.inbox.is_dir():
        raise StpmError(f"no such folder: {args.inbox}")
    if args.settle <= 0 or args.batch_size < 1:
        raise StpmError("--settle must be above 0 and --batch-size at least 1")
    keeper = _keeper(args)
    detector, path = _load(args)
    identity = named_identity(detector, path)
    watcher = Watcher(
        args.inbox, detector, keeper, identity, args.settle, args.batch_size, args.poll
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: watcher.stop())
    _say(f"watching {args.inbox} (Ctrl-C to stop); results in {args.record}")
    try:
        watcher.run()
    finally:
        keeper.close()
    return 0


def _watch_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "stpm-watch",
        "Score the images a camera drops into a folder, each once, into the record; move each "
        "to good/, anomalous/ or error/.",
    )
    parser.add_argument("inbox", type=Path, help="the folder the camera writes into")
    _add_model_argument(parser)
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds a file's size must stay the same before it is scored (one renamed in "
        "is scored at once)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="files per call to the model")
    parser.add_argument(
        "--poll", action="store_true", help="poll instead of file-system events (network shares)"
    )
    _add_record_arguments(parser, required=True)
    _add_runtime_arguments(parser)
    return parser


def _add_record_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("record")
    group.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        required=required,
        help="keep every part in the record in DIR (SQLite on a local disk; the page reads it)",
    )
    group.add_argument(
        "--shifts",
        metavar="HH:MM,...",
        help="shift start times, e.g. 06:00,14:00,22:00 (default: calendar days)",
    )
    group.add_argument("--keep-days", type=float, help="drop parts older than this")
    group.add_argument(
        "--keep-images",
        type=int,
        metavar="N",
        help="keep the overlays (and originals) of the newest N parts",
    )
    group.add_argument(
        "--keep-originals", action="store_true", help="keep each image as received, too"
    )


def _keeper(args: argparse.Namespace):
    """The record's keeper for --record (None without it); retention checked first."""
    if args.record is None:
        return None
    from .record import Keeper, Record, Shifts

    for name in ("keep_days", "keep_images"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise StpmError(f"--{name.replace('_', '-')} must be 0 or more")
    record = Record(args.record, Shifts.parse(args.shifts))
    return Keeper(record, args.keep_days, args.keep_images, keep_originals=args.keep_originals)


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
        f"{runtime.MAX_DEFAULT_THREADS}; torch: its own)",
    )
    group.add_argument(
        "--precision",
        choices=runtime.PRECISIONS,
        default="f32",
        help="OpenVINO's arithmetic (bf16 is faster on CPUs with BF16 units, maps move slightly)",
    )
    group.add_argument("--device", default="auto", help="torch: auto, cpu, cuda or cuda:N")
    group.add_argument(
        "--teacher-weights",
        type=Path,
        help="the teacher file the model used (default: the one its model file names)",
    )
    group.add_argument("--force", action="store_true", help="load even if the teacher differs")


def _load(
    args: argparse.Namespace, world: distributed.World = distributed.ALONE
) -> tuple[STPM, Path]:
    """The model of --model (or the newest run) and its path, with the runtime options applied.

    Under torchrun the processes on one machine share its cores (by default each takes its
    share of the threads one process would) and each takes its own GPU, if any."""
    path = args.model or runs.latest_model()
    _say(f"model: {path}" + ("" if args.model else f" (the newest under {runs.RUNS}/)"))
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
    detector, _ = distributed.check_everywhere(lambda: _load(args, world), world)
    threshold = args.threshold
    if args.max_false_alarms is not None:
        threshold = detector.threshold_at(args.max_false_alarms)
    keeper = _keeper(args)  # under torchrun each process records its share (WAL: one file)
    try:
        result = outputs.score_files(
            detector,
            args.inputs,
            args.out,
            threshold=threshold,
            batch_size=args.batch_size,
            save_maps=args.save_maps,
            images=not args.no_images,
            world=world,
            keeper=keeper,
        )
    finally:
        if keeper is not None:
            keeper.close()
    if not world.main:
        return 1 if result.failures else 0
    _print_table(result.rows, result.summary)
    for row in result.failures:
        print(f"stpm-predict: error: {row['error']}", file=sys.stderr)
    return 1 if result.failures else 0


def _print_table(rows: list[dict], summary: dict, limit: int = 10) -> None:
    scored = sorted((row for row in rows if row["error"] == ""), key=lambda row: -row["score"])
    if scored:
        width = min(60, max(len(row["path"]) for row in scored[:limit]))
        print(f"{'image':{width}s}  {'score':>10s}  {'normalised':>10s}  verdict")
        for row in scored[:limit]:
            name = row["path"] if len(row["path"]) <= width else "..." + row["path"][-width + 3 :]
            print(
                f"{name:{width}s}  {row['score']:10.4g}  {row['normalized_score']:10.2f}  {row['verdict']}"
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
    args = _eval_parser().parse_args(argv)
    from .evaluation import evaluate, format_table, write_report

    world = distributed.join()
    detector, _ = distributed.check_everywhere(lambda: _load(args, world), world)
    folder = data.category_dir(args.category, args.data, args.data_root)
    if not folder.is_dir():
        raise StpmError(f"no such folder: {folder}")
    evaluation = evaluate(detector, folder, batch_size=args.batch_size, world=world)
    if evaluation is None:  # a rank other than 0: its scores went to rank 0
        return 0
    write_report(evaluation, detector, args.out)
    print(format_table(evaluation.metrics))
    for point in evaluation.metrics["operating_points"]:
        print(
            f"{point['chosen_by']} ({point['threshold']:.4g}): caught {point['caught']:.0%} of the "
            f"defective images, {point['false_alarms']} false alarms "
            f"({point['false_alarm_rate']:.1%} of the good ones)"
        )
    if not evaluation.has_masks:
        print(
            f"pixel AUROC and PRO need defect masks ({folder / 'ground_truth'}/<defect>/"
            "<name>_mask.png); written as null"
        )
    print(f"report: {args.out / 'report.md'}")
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "stpm-eval",
        "Image AUROC, pixel AUROC, PRO and F1-max on a category's test/ set, with a report.",
    )
    _add_model_argument(parser)
    _add_data_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder")
    parser.add_argument("--batch-size", type=int, default=16, help="images per call to the model")
    _add_runtime_arguments(parser)
    return parser


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
    parser = _parser(
        "stpm-export",
        "Export a model to one ONNX graph (image -> anomaly map and score) for ONNX Runtime or "
        "OpenVINO, FP32 or INT8, checked against the torch model on defect-free images.",
    )
    _add_model_argument(parser)
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
    parser.add_argument(
        "--teacher-weights",
        type=Path,
        help="the teacher file the model used (default: the one its model file names)",
    )
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
        print(f"student: {before:,} -> {after:,} parameters ({after / before:.0%} remain)")
    if detector.shared_layers_:
        print(f"shared with the teacher: {', '.join(detector.shared_layers_)}")
    return _report_training(detector, run_dir)


def _compress_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "stpm-compress",
        "Make a trained model's student smaller (structured pruning, a stem shared with the "
        "teacher) and fine-tune it by distillation; writes a new run folder. Export it with "
        "stpm-export --int8 for the compact INT8 model.",
    )
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="a run folder (or its model.pt)")
    _add_data_arguments(parser)
    parser.add_argument(
        "--prune",
        type=float,
        help="share of each block's expansion channels to remove, e.g. 0.5 (default: none)",
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


# ---------------------------------------------------------------------- stpm-serve


@_friendly
def serve_main(argv: list[str] | None = None) -> int:
    args = _serve_parser().parse_args(argv)
    needed = ("fastapi", "uvicorn", "python_multipart", "prometheus_client")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise StpmError(f"stpm-serve needs {', '.join(missing)}: pip install 'stpm[serve]'")
    from . import alarms, serve
    from .catalog import Catalog
    from .changes import AUDIT, AuditLog
    from .service import Limits

    _check_serve_arguments(args)
    token, admin_token = serve.read_token(args.token_file), serve.read_token(args.admin_token_file)
    if token is not None and token == admin_token:
        raise StpmError("--token-file and --admin-token-file must hold different tokens")
    args.threads = args.threads or max(1, runtime.default_threads() // args.workers)
    serve.check_split(args.workers, args.threads)
    limits = Limits(
        workers=args.workers,
        max_batch=args.max_batch,
        max_wait=args.max_wait_ms / 1000,
        queue_size=args.queue,
        deadline=args.deadline_ms / 1000,
        body_timeout=args.body_timeout,
        max_body=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels,
    )

    def load(path: Path) -> STPM:
        return _load(argparse.Namespace(**{**vars(args), "model": path}))[0]

    if args.models is not None and args.model is not None:
        raise StpmError("give a model file or --models DIR, not both")
    where = args.models if args.models is not None else (args.model or runs.latest_model())
    # a trail wherever something can change: an admin token, or a folder SIGHUP reads again
    audit = None
    if args.audit_log or admin_token or args.models:
        default = where / AUDIT if args.models else where.parent / AUDIT
        audit = AuditLog(args.audit_log or default)
    keeper = _keeper(args)
    if args.models is not None:
        catalog = Catalog.of_folder(
            load, args.models, limits, audit, args.model_file, keeper=keeper
        )
    else:
        catalog = Catalog.of_file(load, where, limits, audit, keeper=keeper)
    scheme = "https" if args.tls_cert else "http"
    names = ", ".join(sorted(catalog.services))
    print(f"stpm-serve: {names} on {scheme}://{args.host}:{args.port} (docs at /docs)")
    tls = (str(args.tls_cert), str(args.tls_key)) if args.tls_cert else None
    if args.alarm_quiet_minutes <= 0 or args.alarm_run < 1 or args.alarm_drift_window < 1:
        raise StpmError(
            "--alarm-quiet-minutes must be above 0, --alarm-run and --alarm-drift-window at least 1"
        )
    rules = alarms.Rules(args.alarm_quiet_minutes, args.alarm_run, args.alarm_drift_window)
    serve.serve(catalog, args.host, args.port, token, tls, admin_token, rules)
    return 0


def _check_serve_arguments(args: argparse.Namespace) -> None:
    """Limits that make sense, and a certificate that loads, before the model is loaded."""
    if args.workers < 1 or args.max_batch < 1 or args.queue < 1:
        raise StpmError("--workers, --max-batch and --queue must be at least 1")
    if args.max_wait_ms < 0:
        raise StpmError("--max-wait-ms must be 0 or more")
    positive = ("deadline_ms", "body_timeout", "max_body_mb", "max_pixels")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise StpmError(f"--{name.replace('_', '-')} must be above 0")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise StpmError("give --tls-cert and --tls-key together")
    if args.tls_cert is not None:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.tls_cert, args.tls_key
            )
        except (OSError, ssl.SSLError) as error:
            raise StpmError(f"cannot use --tls-cert/--tls-key: {error}") from None


def _serve_parser() -> argparse.ArgumentParser:
    parser = _parser("stpm-serve", "Serve a trained model over HTTP: scores, verdicts, overlays.")
    parser.add_argument(
        "model",
        nargs="?",
        type=Path,
        help=f"model file (default: the newest {runs.RUNS}/**/model.pt)",
    )
    network = parser.add_argument_group("network")
    network.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0: all of them)")
    network.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--models",
        type=Path,
        help="a folder of model folders: each served under its folder's name, at "
        "/v1/models/{name}/...; SIGHUP reads it again",
    )
    parser.add_argument(
        "--model-file",
        default="model.pt",
        help="the file each model folder serves (e.g. model-int8.onnx; default: model.pt)",
    )
    network.add_argument(
        "--token-file", type=Path, help="file holding the bearer token to score and read"
    )
    network.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the token for changes (swaps, thresholds); without it none are made",
    )
    network.add_argument(
        "--audit-log",
        type=Path,
        help="the audit trail, JSON lines (default: audit.jsonl beside the model(s))",
    )
    network.add_argument("--tls-cert", type=Path, help="certificate file (PEM): serve HTTPS")
    network.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    load = parser.add_argument_group("load")
    load.add_argument("--workers", type=int, default=1, help="threads running the model")
    load.add_argument(
        "--max-batch", type=int, default=4, help="most images per call (1: no batching)"
    )
    load.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long a worker waits for a batch to fill, while the last one had company "
        "(0: it takes what is queued)",
    )
    load.add_argument("--queue", type=int, default=16, help="waiting requests; then 503")
    load.add_argument(
        "--deadline-ms",
        type=float,
        default=2000,
        help="a request no worker has taken this long after its body arrived gets 503",
    )
    load.add_argument(
        "--body-timeout", type=float, default=10.0, help="seconds for a body to arrive; then 408"
    )
    load.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body")
    load.add_argument(
        "--max-pixels", type=int, help="largest image (default: stpm.scoring.MAX_IMAGE_PIXELS)"
    )
    _add_record_arguments(parser)
    alarm = parser.add_argument_group("alarms (with --record)")
    alarm.add_argument(
        "--alarm-quiet-minutes", type=float, default=5.0, help="no part for this long"
    )
    alarm.add_argument("--alarm-run", type=int, default=5, help="anomalous parts in a row")
    alarm.add_argument(
        "--alarm-drift-window",
        type=int,
        default=20,
        help="parts whose mean score, outside the validation scores' range, is drift",
    )
    _add_runtime_arguments(parser)
    return parser
