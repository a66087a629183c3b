"""What every speed script shares: peak memory, child processes, the CPU, latencies, tables.

One copy, so that stpm's numbers and anomalib's are measured by the same code. It imports only
the standard library and numpy at the top: the anomalib scripts (scripts/anomalib/) import it
inside anomalib's own virtual environment, where stpm is not installed, and a heavy import here
would count in every child's peak RSS. torch and openvino are imported inside the functions
that need them.

The anomalib scripts find this module through PYTHONPATH (`anomalib_environment()`), which
scripts/benchmark.py and scripts/benchmark_speed.py set when they launch them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
ANOMALIB_SCRIPTS = SCRIPTS / "anomalib"
# stpm.data.IMAGE_EXTENSIONS, repeated because stpm is not installed in anomalib's venv
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The CPU features that decide which kernels the runtimes pick: AVX-512 VNNI for INT8, AVX-512
# BF16 or AMX for BF16. A speed result without them cannot be compared with another machine's.
SPEED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
BATCH_SIZE = 16  # the folder case of every speed script
WARMUP_CALLS = 1  # untimed single-image calls after the timed first call, on both sides
T = TypeVar("T")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (VmHWM, Linux).

    Not ru_maxrss: that is carried over from the parent across fork and exec, so every child
    of a large parent would report the parent's peak.
    """
    return _process_status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident set size now, in MB (VmRSS, Linux)."""
    return _process_status_mb("VmRSS")


def _process_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def thread_environment(threads: int, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with OpenMP and MKL held to `threads` threads."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return {**environment, **(extra_env or {})}


def anomalib_environment() -> dict[str, str]:
    """What the anomalib scripts need to import benchkit and each other (absolute paths)."""
    return {"PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ANOMALIB_SCRIPTS)])}


def start(
    command: list[str], threads: int, log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start command in the background, output (both streams) to log."""
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=thread_environment(threads, extra_env),
        )


def launch(
    command: list[str], threads: int, log: Path, extra_env: dict[str, str] | None = None
) -> None:
    """Run command to its end, output to log; exit naming the log if it fails."""
    if start(command, threads, log, extra_env).wait() != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed; see {log}")


def matmul_peak(threads: int, side: int = 2048, repeats: int = 10) -> float:
    """FP32 FLOP/s of a large matrix product on `threads` threads: what these cores can do."""
    import torch

    torch.set_num_threads(threads)
    first, second = torch.randn(side, side), torch.randn(side, side)
    first @ second
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        first @ second
        times.append(time.perf_counter() - started)
    return 2 * side**3 / min(times)


def time_one_at_a_time(
    score: Callable[[Path], T], paths: Sequence[Path]
) -> tuple[list[T], list[float], float]:
    """score(path) for every path, one call each: the camera case, timed the same on both sides.

    First a timed call on paths[0] (the first after loading), then WARMUP_CALLS untimed ones,
    then every path timed. Returns (outputs in path order, milliseconds: [first call, then one
    per path], seconds of the timed loop).
    """
    started = time.perf_counter()
    score(paths[0])
    milliseconds = [1000 * (time.perf_counter() - started)]
    for index in range(1, WARMUP_CALLS + 1):
        score(paths[index % len(paths)])
    outputs = []
    loop_started = time.perf_counter()
    for path in paths:
        started = time.perf_counter()
        outputs.append(score(path))
        milliseconds.append(1000 * (time.perf_counter() - started))
    return outputs, milliseconds, time.perf_counter() - loop_started


def latency_summary(milliseconds: Sequence[float]) -> dict[str, float]:
    """First-call, median and 99th-percentile latency of per-call times, in call order.

    milliseconds[0] is the first call after loading: lazy initialisation and kernel choice
    land there, what a process that scores one image and exits pays. It is reported alone and
    left out of the median and p99, which describe the calls after the untimed warm-up.
    """
    if not milliseconds:
        raise ValueError("no latencies to summarise")
    steady = np.asarray(milliseconds[1:] or milliseconds, dtype=np.float64)
    return {
        "first_call_ms": float(milliseconds[0]),
        "median_latency_ms": float(np.median(steady)),
        "p99_latency_ms": float(np.percentile(steady, 99)),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def write_markdown_report(
    path: Path,
    title: str,
    notes: Sequence[str],
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    command: str,
) -> None:
    """A results page: the title, notes (one line each: the CPU, what was measured), the table
    and the command that made it."""
    lines = [
        f"# {title}",
        "",
        *notes,
        "",
        *markdown_table(header, rows),
        "",
        f"Command: `{command}`",
    ]
    path.write_text("\n".join(lines) + "\n")


def cpu_info() -> dict:
    """The CPU a result was measured on, from `lscpu`: model, vendor, cores and its flags.

    speed_flags says which of SPEED_FLAGS it has; flags is the full list.
    """
    try:
        output = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        output = ""
    fields = {}
    for line in output.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = sorted(fields.get("Flags", "").split())
    per_socket, sockets = fields.get("Core(s) per socket"), fields.get("Socket(s)")
    cores = int(per_socket) * int(sockets) if per_socket and sockets else os.cpu_count()
    return {
        "model_name": fields.get("Model name", "unknown"),
        "vendor": fields.get("Vendor ID", "unknown"),
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "speed_flags": {flag: flag in flags for flag in SPEED_FLAGS},
        "flags": flags,
    }


def cpu_line(info: dict) -> str:
    """One line for a report: 'AMD EPYC (AuthenticAMD), 2 cores; has avx2, ...; lacks amx_tile'."""
    has = [flag for flag, present in info["speed_flags"].items() if present]
    lacks = [flag for flag, present in info["speed_flags"].items() if not present]
    text = f"{info['model_name']} ({info['vendor']}), {info['cores']} cores"
    text += f"; has {', '.join(has)}" if has else ""
    return text + (f"; lacks {', '.join(lacks)}" if lacks else "")


def openvino_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can compute in BF16 here (AVX-512 BF16 or AMX)."""
    try:
        import openvino
    except ImportError:
        return False
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities


def images_in(folder: Path) -> list[Path]:
    """The image files directly inside folder, sorted (stpm.data.list_images)."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def test_images(category: Path) -> list[Path]:
    """Every image under test/<defect>/: folders sorted, files sorted inside each.

    The order of stpm.data.test_samples, so that maps.npz files of either side line up.
    """
    folders = sorted(path for path in (category / "test").iterdir() if path.is_dir())
    return [image for folder in folders for image in images_in(folder)]


def spread_subset(items: list, limit: int | None) -> list:
    """limit items spread evenly over the list (every k-th), for smoke tests; all if None.

    Evenly, not the first ones: the test set is sorted by defect type, and its first images
    would all be of one type, with no good image to compute an AUROC against.
    """
    if limit is None or limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(index * step)] for index in range(limit)]


def save_maps(
    target: Path,
    category: Path,
    paths: Sequence[Path],
    maps: np.ndarray,
    scores: np.ndarray,
    latencies: Sequence[float],
) -> None:
    """maps.npz as scripts/benchmark.py reads it: raw maps (N, H, W) float32 and scores (N,)
    in test-image order, with their paths relative to the category and per-image latencies."""
    np.savez_compressed(
        target,
        maps=np.asarray(maps, np.float32),
        scores=np.asarray(scores),
        paths=np.array([Path(path).relative_to(category).as_posix() for path in paths]),
        defects=np.array([Path(path).parent.name for path in paths]),
        latency_ms=np.asarray(latencies, np.float32),
    )


# ----------------------------------------------------------------------------- accuracy protocol


def test_halves(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """Boolean selections of test images: half A (every other image sorted by path, to choose
    on), half B (the rest, to check the choice) and all of them."""
    order = np.argsort([str(path) for path in paths])
    half_a = np.zeros(len(paths), bool)
    half_a[order[::2]] = True
    return {"A": half_a, "B": ~half_a, "all": np.ones(len(paths), bool)}


def caught_at(labels: np.ndarray, scores: np.ndarray, false_alarms: float) -> float:
    """Share of defective images above the (1 - false_alarms) quantile of the good ones."""
    threshold = np.quantile(scores[labels == 0], 1.0 - false_alarms)
    return float((scores[labels == 1] > threshold).mean())


def image_figures(labels: np.ndarray, scores: np.ndarray, halves: dict) -> dict:
    """Per half: image AUROC and the share of defects caught at 1% and 5% false alarms."""
    from stpm.metrics import image_auroc

    return {
        name: {
            "image_auroc": image_auroc(labels[chosen], scores[chosen]),
            "caught_at_1": caught_at(labels[chosen], scores[chosen], 0.01),
            "caught_at_5": caught_at(labels[chosen], scores[chosen], 0.05),
        }
        for name, chosen in halves.items()
    }


def write_results(
    folder: Path, name: str, settings: dict, results, markdown: Callable[..., None]
) -> None:
    """folder/name.json ({"settings", "results"}) and folder/name.md, written by
    markdown(results, settings, path); the markdown is printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2, default=str) + "\n"
    )
    markdown(results, settings, folder / f"{name}.md")
    print((folder / f"{name}.md").read_text())
