"""What share of defective images each method catches at a false-alarm rate a line can live with.

AUROC averages over every threshold; a line runs at one, where few good parts are rejected. This
reads the raw image scores the benchmarks write (maps.npz: `scores`, `paths` relative to the
category) and reports, per method, the share of defective images scored above the lowest
threshold that flags at most 0%, 1% and 5% of the good test images, per defect type as well.

Usage:
    python scripts/operating_points.py NAME=path/to/maps.npz [NAME=...] [--out FILE.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RATES = (0.0, 0.01, 0.05)


def caught(scores: np.ndarray, good: np.ndarray, rate: float) -> np.ndarray:
    """Which images score above every good one but the top `rate` share of the good ones
    (stpm.metrics.threshold_for_false_alarms: stpm-eval's report takes the same thresholds)."""
    from stpm.metrics import threshold_for_false_alarms

    return scores > threshold_for_false_alarms(scores[good], rate)


def table(runs: dict[str, Path]) -> list[str]:
    loaded = {name: np.load(path) for name, path in runs.items()}
    kinds = {
        name: np.array([str(p).split("/")[1] for p in z["paths"]]) for name, z in loaded.items()
    }
    defects = sorted(set(np.concatenate(list(kinds.values()))) - {"good"})
    lines = ["| method | false alarms at most | all defects | " + " | ".join(defects) + " |"]
    lines.append("| --- " * (3 + len(defects)) + "|")
    for name, stored in loaded.items():
        good = kinds[name] == "good"
        for rate in RATES:
            flagged = caught(stored["scores"], good, rate)
            cells = [f"{flagged[~good].mean():.2f}"]
            cells += [f"{flagged[kinds[name] == kind].mean():.2f}" for kind in defects]
            lines.append(f"| {name} | {rate:.0%} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=maps.npz")
    parser.add_argument("--out", type=Path, help="write the table here as well")
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"expected NAME=path/to/maps.npz, got {item!r}")
        runs[name] = Path(path)
    lines = [
        "# Share of defective images caught at a fixed false-alarm rate",
        "",
        "Threshold: the lowest that flags at most that share of the good test images.",
        "Command: `python scripts/operating_points.py "
        + " ".join(f"'{name}=MAPS.npz'" for name in runs)
        + "` (maps.npz as scripts/benchmark.py writes them).",
        "",
        *table(runs),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
