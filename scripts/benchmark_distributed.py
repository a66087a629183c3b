"""Past one process: training images/s alone and under torchrun, and scoring images/s through
stpm-predict, stpm-predict under torchrun and Ray Data (stpm.raydata), on this machine.

Usage:
    python scripts/benchmark_distributed.py --data /path/to/magnetic_tile --model MODEL \
        [--epochs 2] [--processes 2] [--rounds 2] [--work distributed_work]

Training: `stpm-train` on --data with the defaults and --epochs, once alone (torch's default
threads) and once under `torchrun --nproc-per-node P` (torchrun gives each process one thread
per core it shares: OMP_NUM_THREADS=1 on two cores). Reported: the images/s of the epochs
(the training loop alone, from the run's history: mean of the epochs after the first) and the
wall time of the whole command (decoding, the teacher's feature cache, validation, writing).

Scoring: every test image of --data with --model (a .pt or an .onnx), CSV only (no overlays,
which Ray's adapter does not draw): stpm-predict alone, stpm-predict under torchrun with P
processes, and stpm.raydata.score_paths with 1 and P workers (threads shared out the same
way), each from a fresh process so that every path pays its own start-up; --rounds times,
round-robin. Reported: wall time from launch to exit, and images/s over that wall time; for
stpm-predict also the images/s of its scoring loop alone (summary.json's seconds: the model
loaded, the processes started; under torchrun, rank 0's loop and the merge).

Results: distributed.json and distributed.md in --results, with the CPU's model and flags.
Time on a quiet machine: every path uses all the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchkit
import torch

BIN = Path(sys.executable).parent
RAY_CHILD = """
import sys, time, json
from stpm.raydata import score_paths
from stpm.data import list_images
from pathlib import Path
paths = list_images(Path(sys.argv[1]), recursive=True)
rows = score_paths(paths, sys.argv[2], workers=int(sys.argv[3]), batch_size=16)
assert len(rows) == len(paths) and not any(row["verdict"] == "error" for row in rows)
"""


def torchrun(processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
    ]


def timed(command: list, log: Path) -> float:
    """Run command to its end (output to log); its wall time in seconds."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run(list(map(str, command)), stdout=handle, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed; see {log}")
    return time.perf_counter() - started


def training(data: Path, epochs: int, processes: int, work: Path) -> list[dict]:
    results = []
    launches = (("1 process", [], 1), ("torchrun", torchrun(processes), processes))
    for name, launcher, count in launches:
        run = work / f"train-{count}"
        command = [*launcher, BIN / "stpm-train", "--data", data, "--epochs", epochs, "--out", run]
        wall = timed(command, work / f"{run.name}.log")
        history = torch.load(run / "model.pt", weights_only=True)["history"]
        config = json.loads((run / "config.json").read_text())
        rates = [epoch["images_per_second"] for epoch in history[1:] or history]
        results.append(
            {
                "path": name,
                "world_size": config["world_size"],
                "backend": config["backend"],
                "images_per_epoch": config["train_images"],
                "epoch_images_per_second": statistics.mean(rates),
                "wall_seconds": wall,
                "final_loss": history[-1]["loss"],
            }
        )
    return results


def scoring(data: Path, model: Path, processes: int, rounds: int, work: Path) -> list[dict]:
    test = data / "test"
    images = len(benchkit.test_images(data))
    paths = {
        "stpm-predict, 1 process": [BIN / "stpm-predict", test, "--model", model, "--no-images"],
        f"stpm-predict, torchrun {processes} processes": [
            *torchrun(processes),
            BIN / "stpm-predict",
            test,
            "--model",
            model,
            "--no-images",
        ],
        "Ray Data, 1 worker": [sys.executable, "-c", RAY_CHILD, test, model, 1],
        f"Ray Data, {processes} workers": [sys.executable, "-c", RAY_CHILD, test, model, processes],
    }
    walls, loops = {name: [] for name in paths}, {name: [] for name in paths}
    for round_ in range(rounds):
        for number, (name, command) in enumerate(paths.items()):
            out = work / f"predict-{number}"
            predict = "stpm-predict" in str(command)
            log = work / f"score-{number}-{round_}.log"
            walls[name].append(timed([*command, *(["--out", out] if predict else [])], log))
            if predict:  # the scoring loop alone, without start-up: summary.json's seconds
                loops[name].append(json.loads((out / "summary.json").read_text())["seconds"])
    return [
        {
            "path": name,
            "images": images,
            "wall_seconds": statistics.median(values),
            "images_per_second": images / statistics.median(values),
            "rounds": values,
            "loop_images_per_second": images / statistics.median(loops[name])
            if loops[name]
            else None,
        }
        for name, values in walls.items()
    ]


def write_markdown(results: dict, settings: dict, path: Path) -> None:
    lines = [
        "# Past one process: torchrun training, sharded and Ray scoring",
        "",
        f"`python scripts/benchmark_distributed.py {settings['command']}`",
        "",
        f"CPU: {benchkit.cpu_line(settings['cpu'])}. One run, paths one after another.",
        "",
        f"## Training ({settings['epochs']} epochs of the defaults on {settings['data']})",
        "",
        *(
            benchkit.markdown_table(
                [
                    "",
                    "processes",
                    "backend",
                    "img/s in epochs",
                    "x 1 process",
                    "wall s (whole command)",
                    "final loss",
                ],
                [
                    [
                        row["path"],
                        row["world_size"],
                        row["backend"] or "-",
                        f"{row['epoch_images_per_second']:.1f}",
                        f"{row['epoch_images_per_second'] / results['training'][0]['epoch_images_per_second']:.2f}",
                        f"{row['wall_seconds']:.0f}",
                        f"{row['final_loss']:.4f}",
                    ]
                    for row in results["training"]
                ],
            )
            if results["training"]
            else ["Not measured in this run (--skip-training)."]
        ),
        "",
        f"## Scoring ({results['scoring'][0]['images']} test images, {Path(settings['model']).name}, "
        f"CSV only; median of {settings['rounds']} rounds, wall time from launch to exit)",
        "",
        *benchkit.markdown_table(
            ["", "wall s", "img/s", "x stpm-predict", "rounds (s)", "img/s in the scoring loop"],
            [
                [
                    row["path"],
                    f"{row['wall_seconds']:.1f}",
                    f"{row['images_per_second']:.1f}",
                    f"{row['images_per_second'] / results['scoring'][0]['images_per_second']:.2f}",
                    ", ".join(f"{value:.1f}" for value in row["rounds"]),
                    f"{row['loop_images_per_second']:.1f}"
                    if row["loop_images_per_second"]
                    else "-",
                ]
                for row in results["scoring"]
            ],
        ),
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="model.pt or .onnx to score with")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("distributed_work"))
    parser.add_argument("--results", type=Path, default=benchkit.SCRIPTS / "results")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {
        "command": " ".join(sys.argv[1:]),
        "cpu": benchkit.cpu_info(),
        "data": str(args.data),
        "model": str(args.model),
        "epochs": args.epochs,
        "processes": args.processes,
        "rounds": args.rounds,
    }
    results = {
        "scoring": scoring(args.data, args.model, args.processes, args.rounds, args.work),
        "training": []
        if args.skip_training
        else training(args.data, args.epochs, args.processes, args.work),
    }
    benchkit.write_results(args.results, "distributed", settings, results, write_markdown)


if __name__ == "__main__":
    main()
