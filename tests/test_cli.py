"""The commands as a user types them: a run folder on success, one clear line on a mistake."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stpm import STPM, cli
from stpm.cli import train_main

from .conftest import SHARED_TILES

TINY_FLAGS = ["--image-size", "64", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


def test_train_writes_a_run_folder(category, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--data", str(category), "--out", str(out), "--seed", "3", *TINY_FLAGS]) == 0
    assert {path.name for path in out.iterdir()} == {
        "model.pt",
        "config.json",
        "loss_curve.png",
        "checkpoint.pt",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 3 and config["image_size"] == [64, 64]
    printed = capsys.readouterr().out
    assert "run folder" in printed
    # what was trained, in words, and numbers rounded for people
    assert "trained a slim student (half the width) of the tf_efficientnet_lite0 teacher" in printed
    assert not re.search(r"\d\.\d{6,}", printed)


def test_category_under_the_data_root_and_default_run_folder(category, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--category", category.name, "--data-root", str(category.parent), *TINY_FLAGS]
    assert train_main(argv) == 0
    runs = list((tmp_path / "runs" / category.name).iterdir())
    assert len(runs) == 1 and (runs[0] / "model.pt").is_file()


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such folder"),
        ("no_train", "no train/good folder"),
        ("empty", "no images in"),
        ("corrupt", "cannot read"),
    ],
)
def test_user_mistakes_give_one_line_and_status_2(tmp_path, capsys, layout, message):
    folder = tmp_path / "category"
    if layout != "missing":
        folder.mkdir()
    if layout in ("empty", "corrupt"):
        (folder / "train" / "good").mkdir(parents=True)
    if layout == "corrupt":
        (folder / "train" / "good" / "bad.png").write_bytes(b"\x89PNG broken")
    assert train_main(["--data", str(folder), "--out", str(tmp_path / "run"), *TINY_FLAGS]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert error.startswith("stpm-train: error:") and message in error and str(folder) in error
    assert not (tmp_path / "run" / "model.pt").exists()


def test_bad_backbone_and_missing_category_flag(capsys):
    assert train_main(["--data", ".", "--backbone", "nonsense_net"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert train_main([]) == 2
    assert "--category" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "stpm-train"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--category" in result.stdout


@pytest.mark.skipif(not SHARED_TILES.is_dir(), reason="needs ../shared/datasets/magnetic_tile")
def test_magnetic_tile_prepared_and_trained(tmp_path):
    """The real dataset: the fixed split, then one short epoch of stpm-train on it."""
    prepared = tmp_path / "magnetic_tile"
    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_magnetic_tile.py"
    subprocess.run(
        [sys.executable, str(script), str(SHARED_TILES), str(prepared)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert len(list((prepared / "train" / "good").iterdir())) == 761
    assert len(list((prepared / "test" / "good").iterdir())) == 191
    assert len(list((prepared / "ground_truth").rglob("*_mask.png"))) == 392
    out = tmp_path / "run"
    argv = ["--data", str(prepared), "--out", str(out), "--epochs", "1", "--image-size", "64"]
    assert train_main(argv) == 0
    assert (out / "model.pt").is_file()


def test_data_warnings_are_one_line_each_and_training_goes_on(tmp_path, capsys):
    from .conftest import make_category

    root = make_category(tmp_path / "tiles")
    first = sorted((root / "train" / "good").iterdir())[0]
    (root / "train" / "good" / "copy.png").write_bytes(first.read_bytes())
    assert train_main(["--data", str(root), "--out", str(tmp_path / "run"), *TINY_FLAGS]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].startswith("stpm-train: warning:")
    assert "1 duplicate image(s) in train/good" in warnings[0]


PARSERS = {
    "train": cli._train_parser,
    "predict": cli._predict_parser,
    "eval": cli._eval_parser,
    "export": cli._export_parser,
    "compress": cli._compress_parser,
}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_shows_one_line_of_help_and_its_default_once(command):
    parser = PARSERS[command]()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        assert text.count("(default") == 1, (command, action.option_strings, text)
    assert "(default: None)" not in parser.format_help()


def test_a_run_with_nothing_to_score_is_a_mistake(trained, tmp_path, capsys):
    _, run_dir = trained
    argv = [str(tmp_path / "missing.png"), "--model", str(run_dir / "model.pt")]
    assert cli.predict_main([*argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"stpm-predict: error: no such file or folder: {tmp_path / 'missing.png'}"]


def test_a_file_that_is_not_a_model_says_so_in_our_words(category, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    image = sorted((category / "test" / "good").iterdir())[0]
    assert cli.predict_main([str(image), "--model", str(text), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error
        == f"stpm-predict: error: {text} is not a readable stpm model file: not a file torch.save wrote (a text file, an image, another format)"
    )


@pytest.mark.parametrize("saved", [False, True])
def test_ctrl_c_while_training_says_how_to_go_on(category, tmp_path, capsys, monkeypatch, saved):
    out = tmp_path / "run"

    def interrupted(self, folder, run_dir=None, **kwargs):
        if saved:  # an epoch finished: its checkpoint is there
            (run_dir / "checkpoint.pt").parent.mkdir(parents=True)
            (run_dir / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(STPM, "fit", interrupted)
    assert train_main(["--data", str(category), "--out", str(out), *TINY_FLAGS]) == 130
    error = capsys.readouterr().err.strip()
    if saved:
        assert error == f"stpm-train: interrupted; continue with: stpm-train --resume {out}"
    else:
        assert error == "stpm-train: interrupted; no epoch had finished, nothing to resume"
