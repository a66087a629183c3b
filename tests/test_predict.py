"""Prediction from Python and from the command line: same numbers, any image, clear failures."""

from __future__ import annotations

import csv
import json
import os

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from stpm import STPM, StpmError
from stpm import weights as stpm_weights
from stpm.cli import predict_main

from .conftest import texture


def test_predict_accepts_every_kind_of_input(trained, category):
    model, _ = trained
    path = sorted((category / "test" / "scratch").iterdir())[0]
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    from_path = model.predict(path)[0]
    from_array = model.predict(rgb)[0]
    from_gray = model.predict(rgb[:, :, 0])[0]
    from_float = model.predict(rgb.astype(np.float32) / 255)[0]
    from_tensor = model.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0]
    assert from_path.path == str(path) and from_array.path is None
    for other in (from_array, from_gray, from_float, from_tensor):
        assert other.score == pytest.approx(from_path.score, rel=1e-5)
    assert len(model.predict([path, path])) == 2
    assert len(model.predict(category / "test" / "good")) == 3


def test_maps_come_back_at_each_images_own_size(trained):
    model, _ = trained
    wide = np.dstack([texture(np.random.default_rng(1), 120)[:50]] * 3)  # 50 x 120
    prediction = model.predict(wide)[0]
    assert prediction.anomaly_map.shape == prediction.mask.shape == (50, 120)
    assert prediction.mask.dtype == bool
    assert prediction.is_anomalous == (prediction.score > model.threshold_)
    assert prediction.mask.any() == (prediction.anomaly_map.max() > model.threshold_)


def test_normalised_scores_put_the_threshold_at_one_half(trained):
    model, _ = trained
    assert model.normalize_score(model.threshold_) == pytest.approx(0.5)
    assert model.normalize_score(model.validation_mean_) == pytest.approx(0.0)
    assert model.normalize_score(10 * model.threshold_) == 1.0
    low = model.predict(np.zeros((64, 64), np.uint8), threshold=0.0)[0]
    assert low.is_anomalous and low.mask.all()


def test_defects_score_higher_than_good_images(trained, category):
    model, _ = trained
    good = model.predict(category / "test" / "good")
    defect = model.predict(category / "test" / "scratch")
    assert min(p.score for p in defect) > max(p.score for p in good)
    assert all(p.is_anomalous for p in defect)
    # the defect is rows 30-50, columns 20-60 of 80 x 80: the map ranks its pixels first
    mask = np.zeros((80, 80), bool)
    mask[30:50, 20:60] = True
    for prediction in defect:
        assert roc_auc_score(mask.ravel(), prediction.anomaly_map.ravel()) > 0.9


def test_untrained_model_and_bad_arrays(trained):
    with pytest.raises(StpmError, match="not trained"):
        STPM().predict(np.zeros((8, 8), np.uint8))
    model, _ = trained
    with pytest.raises(StpmError, match="NaN"):
        model.predict(np.full((8, 8), np.inf, np.float32))


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_writes_overlays_masks_csv_and_summary(trained, category, tmp_path, capsys):
    model, run_dir = trained
    out = tmp_path / "out"
    code = predict_main(
        [
            str(category / "test"),
            "--model",
            str(run_dir / "model.pt"),
            "--out",
            str(out),
            "--save-maps",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 6 and {row["verdict"] for row in rows} <= {"good", "anomalous"}
    # same names in test/good and test/scratch: the folders are mirrored, nothing overwritten
    for defect in ("good", "scratch"):
        for index in range(3):
            for suffix in ("_overlay.png", "_mask.png", "_map.npy"):
                assert (out / defect / f"{index:03d}{suffix}").is_file()
    overlay = cv2.imread(str(out / "scratch" / "000_overlay.png"))
    # the image at its own size under a banner (verdict in words, colour scale) as wide as it
    assert overlay.shape[1:] == (80, 3) and 80 < overlay.shape[0] < 2 * 80
    mask = cv2.imread(str(out / "scratch" / "000_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (80, 80) and set(np.unique(mask)) <= {0, 255}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["failed"] == 0
    assert "6 images" in capsys.readouterr().out
    # the library gives the same scores as the command line
    library = {p.path: p.score for p in model.predict([row["path"] for row in rows])}
    for row in rows:
        assert float(row["score"]) == pytest.approx(library[row["path"]], rel=1e-5)
        assert float(row["normalized_score"]) == pytest.approx(
            model.normalize_score(library[row["path"]]), abs=1e-4
        )


def test_cli_goes_on_past_bad_files_and_exits_non_zero(trained, tmp_path, capsys):
    _, run_dir = trained
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "good.png"), texture(rng))
    cv2.imwrite(str(images / "sixteen.png"), texture(rng).astype(np.uint16) * 257)
    cv2.imwrite(
        str(images / "alpha.png"),
        np.dstack([texture(rng)] * 3 + [np.full((80, 80), 255, np.uint8)]),
    )
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes((images / "good.png").read_bytes()[:100])
    out = tmp_path / "out"
    code = predict_main(
        [
            str(images),
            str(tmp_path / "missing.png"),
            "--model",
            str(run_dir / "model.pt"),
            "--out",
            str(out),
        ]
    )
    assert code == 1
    rows = {os.path.basename(row["path"]): row for row in read_csv(out / "predictions.csv")}
    assert {name for name, row in rows.items() if row["verdict"] == "error"} == {
        "empty.png",
        "truncated.png",
        "missing.png",
    }
    assert all(rows[name]["score"] for name in ("good.png", "sixteen.png", "alpha.png"))
    assert "empty.png" in capsys.readouterr().err


def test_cli_default_model_is_the_newest_run(trained, category, tmp_path, monkeypatch, capsys):
    _, run_dir = trained
    monkeypatch.chdir(tmp_path)
    newest = tmp_path / "runs" / "tiles" / "2099"
    newest.mkdir(parents=True)
    (newest / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    image = sorted((category / "test" / "good").iterdir())[0]
    assert predict_main([str(image), "--out", "out"]) == 0
    chosen = str(newest.relative_to(tmp_path) / "model.pt")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["model"] == chosen
    assert f"model: {chosen} (the newest under runs/)" in capsys.readouterr().out


def tamper(run_dir, tmp_path, **changes):
    state = torch.load(run_dir / "model.pt", weights_only=True)
    state.update(changes)
    path = tmp_path / "tampered.pt"
    torch.save(state, path)
    return path


def resnet_teacher(tmp_path):
    """A local resnet18 teacher file, so the test needs no hub."""
    torch.save(
        stpm_weights.create_backbone("resnet18", None, False).state_dict(), tmp_path / "r18.pth"
    )
    return {"source": f"file:{tmp_path / 'r18.pth'}", "sha256": "0" * 64}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda run, tmp: tmp / "nothing.pt", "not found"),
        (
            lambda run, tmp: (
                (tmp / "random.pt").write_bytes(np.random.default_rng(0).bytes(256))
                and tmp / "random.pt"
            ),
            "not a readable stpm model file",
        ),
        (
            lambda run, tmp: (
                torch.save({"weights": torch.zeros(2)}, tmp / "other.pt") or tmp / "other.pt"
            ),
            "not an stpm model file",
        ),
        (lambda run, tmp: tamper(run, tmp, format_version=99), "newer stpm"),
        (lambda run, tmp: tamper(run, tmp, teacher={"source": "x", "sha256": "0" * 64}), "--force"),
        (
            lambda run, tmp: tamper(run, tmp, backbone="resnet18", teacher=resnet_teacher(tmp)),
            "do not fit",
        ),
    ],
    ids=["missing", "random-bytes", "foreign-dict", "newer", "other-teacher", "other-backbone"],
)
def test_cli_refuses_model_files_that_are_not_ours(
    trained, category, tmp_path, capsys, make, message
):
    _, run_dir = trained
    model_path = make(run_dir, tmp_path)
    image = sorted((category / "test" / "good").iterdir())[0]
    assert predict_main([str(image), "--model", str(model_path), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("stpm-predict: error:") and message in error


def test_other_teacher_loads_with_force(trained, tmp_path):
    _, run_dir = trained
    path = tamper(run_dir, tmp_path, teacher={"source": "x", "sha256": "0" * 64})
    assert STPM.load(path, force=True).teacher_["sha256"] == "0" * 64


def test_cli_folder_without_images(trained, tmp_path, capsys):
    _, run_dir = trained
    (tmp_path / "empty").mkdir()
    assert predict_main([str(tmp_path / "empty"), "--model", str(run_dir / "model.pt")]) == 2
    assert "no images in folder" in capsys.readouterr().err


class WritesAFile:
    """A pickle payload that runs code when unpickled: it would create a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_malicious_model_file_runs_no_code(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    torch.save({"format": "stpm-model", "payload": WritesAFile(target)}, path, pickle_protocol=2)
    assert not target.exists()
    with pytest.raises(StpmError, match="not a readable stpm model file"):
        STPM.load(path)
    assert not target.exists()
    torch.load(path, weights_only=False)  # proof the payload is real: full unpickling runs it
    assert target.exists()


def test_set_map_recomputes_the_threshold_without_retraining(trained, category, tmp_path):
    model, run_dir = trained
    validation = json.loads((run_dir / "config.json").read_text())["validation_images"]
    remapped = STPM.load(run_dir / "model.pt", device="cpu").set_map("sum", 2.0, validation)
    assert remapped.combine == "sum" and remapped.smoothing_sigma == 2.0
    assert remapped.threshold_ != model.threshold_
    again = STPM.load(remapped.save(tmp_path / "sum.pt"))
    assert again.threshold_ == remapped.threshold_ and again.combine == "sum"
    image = sorted((category / "test").rglob("*.png"))[0]
    assert again.predict(image)[0].score == pytest.approx(remapped.predict(image)[0].score)
    with pytest.raises(StpmError, match="combine"):
        remapped.set_map("max", 0.0, validation)
    assert remapped.combine == "sum"  # a refused change changes nothing
