"""What the record costs: the time a part's row adds, and the review's queries over 100,000 parts.

Usage:
    python scripts/record_bench.py --model MODEL.onnx --images /path/to/magnetic_tile/test \
        [--parts 3000] [--rows 100000]

Measured, in one run, on a local disk:
  - per part, as the service does it after scoring: the row built (size, SHA-256 of the file,
    the model's identity) and committed (stpm.record.Keeper.keep), median and p99 over --parts
    real parts of the test set, one after another (the service's top rate is one part per
    scoring call, 7-15 ms here, far slower than a commit); the overlay's drawing and writing,
    done afterwards on the keeper's thread, timed apart;
  - the review's queries over --rows parts (random times over 30 days, scores, verdicts and
    marks): a page of 50, newest first, by verdict, by score, by mark, in a time range, deep
    pages (offset 10,000 and 50,000), and the shift's counts.
Results, with the CPU named: record.md and record.json in --results.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchkit
import numpy as np

from stpm import STPM
from stpm.record import Keeper, Record, part_from
from stpm.service import model_identity, overlay_png


def per_part(args: argparse.Namespace, work: Path) -> dict:
    detector = STPM.load(args.model)
    identity = {"name": "tile", **model_identity(detector, args.model)}
    paths = benchkit.spread_subset(sorted(args.images.rglob("*.jpg")), args.parts)
    encoded = [path.read_bytes() for path in paths]
    predictions = [p for _, p in detector.predict_iter(encoded[:200], keep_images=True)]
    keeper = Keeper(Record(work / "record"))
    commits, overlays = [], []
    for index, data in enumerate(encoded):
        prediction = predictions[index % len(predictions)]
        started = time.perf_counter()
        part = part_from("service", paths[index].name, data, identity, prediction)
        part_id = keeper.record.add(part, overlay=True)
        commits.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        keeper.record.write_overlay(part_id, overlay_png(prediction))
        overlays.append((time.perf_counter() - started) * 1000)
    keeper.close()
    return {
        "parts": len(encoded),
        "row_ms": _summary(commits),
        "overlay_ms": _summary(overlays),
        "image_size": list(predictions[0].image.shape[:2]),
    }


def queries(args: argparse.Namespace, work: Path) -> dict:
    kept = Record(work / "review")
    rng, now = random.Random(0), time.time()
    writer = kept._writer
    rows = []
    for index in range(args.rows):
        score = rng.gauss(1.0, 0.3)
        verdict = "anomalous" if score > 1.5 else ("error" if rng.random() < 0.002 else "good")
        moment = now - rng.uniform(0, 30 * 86400)
        rows.append(
            (moment, kept.shifts.start_of(moment), "service", f"part-{index}.jpg", 1000, "0" * 64,
             score, 0.5, 0.1, verdict, 1.5, "tile", "0" * 64, "{}", None,
             f"overlays/x/{index}.png", "written")
        )  # fmt: skip
    writer.execute("BEGIN")
    writer.executemany(
        "INSERT INTO parts (time, shift, source, name, size, sha256, score, normalized_score, "
        "image_term, verdict, threshold, model_name, model_sha256, model, error, overlay, "
        "overlay_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    writer.execute("COMMIT")
    for part_id in rng.sample(range(1, args.rows + 1), args.rows // 100):
        kept.mark(part_id, rng.choice(["false_alarm", "defect"]), "score", "bench")
    week = now - 7 * 86400
    cases = {
        "newest page": lambda: kept.parts(limit=50),
        "anomalous, newest": lambda: kept.parts(verdict="anomalous", limit=50),
        "by score": lambda: kept.parts(order="score", limit=50),
        "marked false alarms": lambda: kept.parts(mark="false_alarm", limit=50),
        "last 7 days by score": lambda: kept.parts(since=week, order="score", limit=50),
        "page at offset 10,000": lambda: kept.parts(limit=50, offset=10_000),
        "page at offset 50,000": lambda: kept.parts(limit=50, offset=50_000),
        "shift counts": lambda: kept.counts(kept.shifts.start_of(now)),
    }
    found = {}
    for label, query in cases.items():
        times = []
        for _ in range(7):
            started = time.perf_counter()
            query()
            times.append((time.perf_counter() - started) * 1000)
        found[label] = {"median_ms": statistics.median(times), "max_ms": max(times)}
        print(label, found[label], flush=True)
    return {"rows": args.rows, "marks": args.rows // 100, "queries": found}


def _summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "p99": float(np.percentile(values, 99)),
        "max": max(values),
    }


def write(results: dict, out: Path, command: str) -> None:
    (out / "record.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    part, review = results["per_part"], results["review"]
    row, overlay = part["row_ms"], part["overlay_ms"]
    rows = [
        ["row (built and committed, before the answer)", f"{row['median']:.3f}",
         f"{row['p99']:.3f}", f"{row['max']:.2f}"],
        ["overlay (drawn and written, after the answer)", f"{overlay['median']:.3f}",
         f"{overlay['p99']:.3f}", f"{overlay['max']:.2f}"],
    ]  # fmt: skip
    queries = [
        [label, f"{q['median_ms']:.1f}", f"{q['max_ms']:.1f}"]
        for label, q in review["queries"].items()
    ]
    worst = max(q["median_ms"] for q in review["queries"].values())
    lines = [
        "# The record's cost",
        "",
        f"CPU: {benchkit.cpu_line(results['cpu'])}.",
        f"Flags: {' '.join(results['cpu']['flags'])}",
        "",
        f"## Per part ({part['parts']} Magnetic Tile test images, {part['image_size'][1]} x "
        f"{part['image_size'][0]} overlays), ms",
        "",
        *benchkit.markdown_table(["", "median", "p99", "max"], rows),
        "",
        f"Target: the row under 1 ms median: {'met' if row['median'] < 1 else '**missed**'} "
        f"({row['median']:.3f} ms).",
        "",
        f"## The review's queries over {review['rows']:,} parts ({review['marks']:,} marked), "
        "a page of 50, ms (7 runs)",
        "",
        *benchkit.markdown_table(["query", "median", "max"], queries),
        "",
        f"Target: under 200 ms a page: {'met' if worst < 200 else '**missed**'} "
        f"(the slowest median {worst:.1f} ms).",
        "",
        f"Command: `{command}`",
        "",
    ]
    report, heading = out / "record.md", "## At the service's top rate"  # load_test.py's part
    earlier = report.read_text().partition(heading) if report.exists() else ("", "", "")
    report.write_text("\n".join(lines) + ("\n" + heading + earlier[2] if earlier[1] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="an ONNX export")
    parser.add_argument("--images", type=Path, required=True, help="a folder of test images")
    parser.add_argument("--parts", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--results", type=Path, default=benchkit.SCRIPTS / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as work:  # a local disk, not tmpfs
        results = {
            "cpu": benchkit.cpu_info(),
            "per_part": per_part(args, Path(work)),
            "review": queries(args, Path(work)),
        }
    command = "python scripts/record_bench.py " + " ".join(sys.argv[1:])
    results["command"] = command
    write(results, args.results, command)
    print((args.results / "record.md").read_text())


if __name__ == "__main__":
    main()
