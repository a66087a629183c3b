"""Several processes under torchrun (gloo, CPU): training with DDP, resuming it, sharded scoring,
and the pieces they rest on (stpm.distributed)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stpm import STPM, distributed
from stpm.distributed import World
from stpm.model import feature_loss, layer_distances

from .ddp_worker import SETTINGS

WORKER = Path(__file__).with_name("ddp_worker.py")
BIN = Path(sys.executable).parent  # the commands of the environment running the tests
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
OUR_TRACEBACK = re.compile(r'File ".*[/\\]stpm[/\\]\w+\.py"')
TRAIN_FLAGS = [
    *("--image-size", "64", "--strides", "4", "8", "16", "--epochs", "6", "--batch-size", "4"),
    *("--validation-fraction", "0.25", "--seed", "1", "--device", "cpu"),
]


def torchrun(*argv, processes: int = 2, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.Popen(
        [*command, f"--nproc-per-node={processes}", *map(str, argv)],
        env=ONE_THREAD,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def students(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def relative_difference(a: dict, b: dict) -> float:
    keys = [key for key in a if a[key].is_floating_point()]
    difference = sum((a[key] - b[key]).double().pow(2).sum() for key in keys)
    return float((difference / sum(a[key].double().pow(2).sum() for key in keys)).sqrt())


# ---------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("count", [0, 1, 5, 8])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_cover_every_item_once_in_order(count, size):
    parts = [range(count)[distributed.shard(count, World(rank=r, size=size))] for r in range(size)]
    assert [item for part in parts for item in part] == list(range(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_loss_shares_add_up_to_the_whole_batch():
    """What DDP averages: each process's share of the loss, with the quantile and the count of
    the whole batch, sums to the one-process loss; and so do the gradients."""
    torch.manual_seed(0)
    teacher = [torch.randn(5, 8, 6, 6), torch.randn(5, 16, 3, 3)]
    student = [torch.randn(5, 8, 6, 6, requires_grad=True), torch.randn(5, 16, 3, 3)]
    whole = feature_loss(teacher, student, hard_quantile=0.9)
    (expected,) = torch.autograd.grad(whole, student[0])
    every_row = [level.detach().flatten() for level in layer_distances(teacher, student)]
    shares = []
    for part in (slice(0, 3), slice(3, 5), slice(5, 5)):  # the last process idles
        rows = iter(every_row)  # what gather_rows returns, level by level
        share = feature_loss(
            [level[part] for level in teacher],
            [level[part] for level in student],
            hard_quantile=0.9,
            gather=lambda _, rows=rows: next(rows),
        )
        shares.append(share)
    assert torch.allclose(sum(shares), whole, rtol=1e-6)
    (gradient,) = torch.autograd.grad(sum(shares), student[0])
    assert torch.allclose(gradient, expected, rtol=1e-5, atol=1e-9)


def test_one_process_world_changes_nothing():
    assert distributed.join() == distributed.ALONE
    assert distributed.gather([1, 2], distributed.ALONE) == [1, 2]
    assert distributed.from_main(lambda: 3, distributed.ALONE) == 3
    distributed.agree_on_files(["nowhere.png"], "anything", distributed.ALONE)


# ---------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def frozen_batchnorm_runs(category, tmp_path_factory):
    """The same training alone and in two processes, BatchNorm frozen in both."""
    alone, two = tmp_path_factory.mktemp("alone"), tmp_path_factory.mktemp("two")
    single = subprocess.Popen(
        [sys.executable, WORKER, category, alone, "--frozen-batchnorm"], env=ONE_THREAD
    )
    assert single.wait(timeout=300) == 0
    finish(torchrun(WORKER, category, two, "--frozen-batchnorm"))
    return alone, two


def test_two_processes_train_what_one_would(frozen_batchnorm_runs):
    """With BatchNorm frozen, nothing but the order of float additions separates two processes
    from one: the same global batches, quantiles, counts and gradients (9 images in batches of
    4: the last one leaves a process idle)."""
    alone, two = frozen_batchnorm_runs
    ranks = [students(two / f"rank{rank}.pt") for rank in (0, 1)]
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])
    assert relative_difference(students(alone / "rank0.pt"), ranks[0]) < 1e-5


def test_two_processes_with_batchnorm(category, tmp_path):
    """BatchNorm as it trains: each process normalises its share of the batch (2 images, not
    4) by that share's statistics, so the weights differ from one process's in the way two
    seeds' would, only closer. Both ranks still end identical, running statistics included, and
    the training converges to a loss like one process's (within 10 %)."""
    finish(torchrun(WORKER, category, tmp_path))
    ranks = [students(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["world_size"], config["backend"]) == (2, "gloo")
    history = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["history"]
    alone = STPM(**SETTINGS).fit(category)
    assert history[-1]["loss"] == pytest.approx(alone.history_[-1]["loss"], rel=0.1)


def test_ranks_with_different_training_files_refuse_to_train(category, tmp_path):
    from .conftest import make_category

    other = make_category(tmp_path / "other", train=9, seed=5)  # same names, other images
    process = torchrun(WORKER, category, tmp_path, "--rank-1-data", other)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "the ranks disagree on the training images" in output


def checkpoint_epoch(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def children(pid: int) -> list[int]:
    """The processes torchrun started (they run in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers in /proc")
def test_killed_torchrun_training_resumes_to_the_same_weights(category, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(torchrun(BIN / "stpm-train", "--data", category, "--out", reference, *TRAIN_FLAGS))
    process = torchrun(BIN / "stpm-train", "--data", category, "--out", killed, *TRAIN_FLAGS)
    deadline = time.monotonic() + 300
    while checkpoint_epoch(killed) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "finished before the kill"
        time.sleep(0.01)
    for worker in children(process.pid):  # every process at once, as a power cut would
        os.kill(worker, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode != 0
    assert not (killed / "model.pt").exists()
    finish(torchrun(BIN / "stpm-train", "--resume", killed))
    weights = [
        torch.load(run / "model.pt", weights_only=True)["student"] for run in (reference, killed)
    ]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_batch_that_does_not_split_is_refused(category, tmp_path):
    flags = [*TRAIN_FLAGS[:-6], "--batch-size", "3", *TRAIN_FLAGS[-4:]]
    process = torchrun(BIN / "stpm-train", "--data", category, "--out", tmp_path, *flags)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert output.count("does not split evenly between 2 processes") == 1  # rank 0 says it
    assert not OUR_TRACEBACK.search(output)  # torchrun's own report of the exit status follows


# ---------------------------------------------------------------------- scoring


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_sharded_predict_writes_the_rows_one_process_writes(trained, category, tmp_path):
    _, run_dir = trained
    inputs = [category / "test", category / "train" / "good"]
    alone = subprocess.run(
        [BIN / "stpm-predict", *inputs, "--model", run_dir / "model.pt", "--out", tmp_path / "one"],
        env=ONE_THREAD,
        capture_output=True,
    )
    assert alone.returncode == 0, alone.stderr
    two = tmp_path / "two"
    finish(torchrun(BIN / "stpm-predict", *inputs, "--model", run_dir / "model.pt", "--out", two))
    # the same rows in the same order; a score may differ in its sixth digit, as the processes
    # batch the images differently (9 + 9, not 16 + 2) and float32 sums round accordingly
    merged, single = rows(two / "predictions.csv"), rows(tmp_path / "one" / "predictions.csv")
    assert [(row[0], row[3], row[4]) for row in merged] == [(r[0], r[3], r[4]) for r in single]
    for row, reference in zip(merged[1:], single[1:], strict=True):
        assert float(row[1]) == pytest.approx(float(reference[1]), rel=1e-5, abs=1e-6)
    assert len(rows(two / "predictions.csv")) == 1 + 6 + 12
    summary = json.loads((two / "summary.json").read_text())
    assert summary["images_per_rank"] == [9, 9] and summary["images"] == 18
    assert not list(two.glob("predictions.rank*.csv"))
    pictures = sorted(path.relative_to(two) for path in two.rglob("*.png"))
    assert pictures == sorted(
        path.relative_to(tmp_path / "one") for path in (tmp_path / "one").rglob("*.png")
    )


def test_sharded_eval_gives_the_metrics_of_one_process(trained, category, tmp_path):
    _, run_dir = trained
    model = run_dir / "model.pt"
    alone = subprocess.run(
        [BIN / "stpm-eval", "--model", model, "--data", category, "--out", tmp_path / "one"],
        env=ONE_THREAD,
        capture_output=True,
    )
    assert alone.returncode == 0, alone.stderr
    finish(
        torchrun(BIN / "stpm-eval", "--model", model, "--data", category, "--out", tmp_path / "two")
    )
    one, two = (
        json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")
    )
    assert two.pop("images_per_rank") == [3, 3]
    assert_close(one, two)  # threads differ: the scores agree to float32's last digits


def assert_close(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key])
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    else:
        assert a == b


def test_a_model_missing_on_one_rank_is_a_clear_error(trained, category, tmp_path):
    process = torchrun(BIN / "stpm-predict", category / "test", "--model", tmp_path / "nowhere.pt")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "rank 0" in output and "rank 1" in output and "nowhere.pt" in output
    assert not OUR_TRACEBACK.search(output)  # torchrun's own report of the exit status follows


# ---------------------------------------------------------------------- many categories


def test_many_categories_skip_finished_runs_and_resume_interrupted_ones(tmp_path, capsys):
    from stpm.cli import train_main

    from .conftest import make_category

    root, out = tmp_path / "data", tmp_path / "runs"
    make_category(root / "a", train=6)
    make_category(root / "b", train=6, seed=1)
    (root / "notes").mkdir()  # not a category: no train/good
    flags = [*TRAIN_FLAGS[:6], "--epochs", "2", *TRAIN_FLAGS[8:], "--out", str(out)]
    assert train_main(["--all-categories", "--data-root", str(root), *flags]) == 0
    assert {path.parent.name for path in out.glob("*/model.pt")} == {"a", "b"}
    finished = (out / "a" / "model.pt").stat().st_mtime_ns
    (out / "b" / "model.pt").unlink()  # b as a crash leaves it: a checkpoint, no model
    capsys.readouterr()
    assert train_main(["--category", "a", "b", "c", "--data-root", str(root), *flags]) == 1
    report = capsys.readouterr()
    assert "a: finished before, skipped" in report.out and "b: resuming" in report.out
    assert "0 trained, 1 resumed, 1 skipped, 1 failed (c)" in report.out
    assert "c: no such folder" in report.err
    assert (out / "a" / "model.pt").stat().st_mtime_ns == finished
    assert (out / "b" / "model.pt").is_file()


def test_all_categories_refuses_a_folder_too(tmp_path, capsys):
    from stpm.cli import train_main

    assert train_main(["--all-categories", "--data", str(tmp_path)]) == 2
    assert "give no --category or --data" in capsys.readouterr().err
