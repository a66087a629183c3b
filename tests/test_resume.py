"""A run killed mid-training (SIGKILL) resumes from its last checkpoint to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from stpm.cli import train_main

FLAGS = [
    "--image-size",
    "64",
    "--epochs",
    "8",  # epochs after the last kill point, so the kill never comes after the end
    "--batch-size",
    "2",
    "--validation-fraction",
    "0.25",
    "--seed",
    "1",
    "--device",
    "cpu",
]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic in every process


def train(*argv: str) -> subprocess.Popen:
    code = "import sys; from stpm.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def checkpoint_epoch(run_dir) -> int:
    try:
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def students(path):
    return torch.load(path, weights_only=True)["student"]


@pytest.fixture(scope="module")
def reference(category, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    assert train("--data", str(category), "--out", str(run_dir), *FLAGS).wait(timeout=600) == 0
    return students(run_dir / "model.pt")


@pytest.mark.parametrize("kill_after_epoch", [1, 2, 4])
def test_killed_run_resumes_to_identical_weights(category, tmp_path, reference, kill_after_epoch):
    run_dir = tmp_path / "run"
    process = train("--data", str(category), "--out", str(run_dir), *FLAGS)
    deadline = time.monotonic() + 300
    while checkpoint_epoch(run_dir) < kill_after_epoch:
        assert process.poll() is None and time.monotonic() < deadline, "finished before the kill"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # mid-way through the next epoch
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "model.pt").exists()
    resumed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from stpm.cli import train_main; sys.exit(train_main(sys.argv[1:]))",
            "--resume",
            str(run_dir),
        ],
        env=ONE_THREAD,
        capture_output=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-500:]
    weights = students(run_dir / "model.pt")
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    history = torch.load(run_dir / "model.pt", weights_only=True)["history"]
    assert [record["epoch"] for record in history] == list(range(1, 9))


def test_a_finished_run_trains_longer_to_the_same_weights(category, tmp_path, reference):
    """No learning-rate schedule: 3 epochs, then 5 more, equal 8 from the start."""
    run_dir = tmp_path / "run"
    short = [flag if flag != "8" else "3" for flag in FLAGS]
    assert train("--data", str(category), "--out", str(run_dir), *short).wait(timeout=600) == 0
    assert train("--resume", str(run_dir), "--epochs", "8").wait(timeout=600) == 0
    weights = students(run_dir / "model.pt")
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    assert train("--resume", str(run_dir), "--epochs", "2").wait(timeout=600) == 2  # fewer


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    assert train_main(["--resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
