"""Nothing lost on a crash: model files and prediction CSVs survive SIGKILL at any moment."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from stpm import STPM
from stpm.files import atomic_write

from .conftest import texture


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")

    def half_then_crash(path):
        with open(path, "w") as handle:
            handle.write("new but cut")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


SAVE_FOREVER = """
import sys
from stpm import STPM
model = STPM.load(sys.argv[1], device="cpu")
thresholds = [1.0, 2.0]
count = 0
while True:
    model.threshold_ = thresholds[count % 2]
    model.save(sys.argv[2])
    count += 1
    print(count, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.031, 0.07, 0.15])
def test_model_file_is_old_or_new_after_sigkill_mid_save(trained, tmp_path, delay):
    _, run_dir = trained
    target = tmp_path / "model.pt"
    process = subprocess.Popen(
        [sys.executable, "-c", SAVE_FOREVER, str(run_dir / "model.pt"), str(target)],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    process.stdout.readline()  # the first save finished; keep saving, then kill at a random point
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert STPM.load(target, device="cpu").threshold_ in (1.0, 2.0)


def test_predictions_csv_has_only_whole_lines_after_sigkill(trained, tmp_path):
    _, run_dir = trained
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(400):
        cv2.imwrite(str(images / f"{index:03d}.png"), texture(rng))
    out = tmp_path / "out"
    code = "import sys; from stpm.cli import predict_main; sys.exit(predict_main(sys.argv[1:]))"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(images),
            "--model",
            str(run_dir / "model.pt"),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    csv_path = out / "predictions.csv"
    deadline = time.monotonic() + 300
    while not csv_path.is_file() or csv_path.read_text().count("\n") < 30:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    text = csv_path.read_text()
    assert text.endswith("\n")
    rows = list(csv.DictReader(text.splitlines()))
    assert 29 <= len(rows) < 400
    # a score is the map's maximum plus the image term, which is negative for a very typical part
    assert all(
        row["verdict"] in ("good", "anomalous") and math.isfinite(float(row["score"]))
        for row in rows
    )


def test_written_files_get_the_usual_permissions(tmp_path):
    from stpm.files import atomic_write_text

    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.md", "hello")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
