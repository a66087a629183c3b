"""Each setting declared once (stpm.settings.SETTINGS): STPM's signature and docstring,
stpm-train's flags, config.json, the model description and the defaults of older files all
agree with it."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields

import pytest
import torch

from stpm import STPM, StpmError, settings
from stpm.cli import _estimator, _train_parser
from stpm.modelfile import BEFORE

# settings a model file does not keep: where the teacher's weights were read from (it keeps
# their source and fingerprint instead), and where and how training ran (config.json does)
UNDESCRIBED = {"teacher_weights", "device", "threads"}
AS_USED = {"device", "threads"}  # config.json records what was used: cpu, the thread count


def test_stpms_parameters_are_the_settings_in_order_with_their_defaults():
    parameters = list(inspect.signature(STPM.__init__).parameters.values())[1:]
    assert [p.name for p in parameters] == [s.name for s in settings.SETTINGS]
    for parameter in parameters:
        assert parameter.default == settings.BY_NAME[parameter.name].default, parameter.name
    documented = STPM.__doc__
    for setting in settings.SETTINGS:
        assert f"{setting.name} [{setting.flag}]: {setting.help}" in " ".join(documented.split())


def test_each_setting_is_a_flag_of_stpm_train_with_its_choices_and_default():
    """The flags a user types (--lr for learning_rate, --resize for resize_mode...) and what
    they give with nothing typed: the library's own defaults."""
    actions = {action.dest: action for action in _train_parser()._actions}
    for setting in settings.SETTINGS:
        action = actions[setting.name]
        assert action.option_strings == [setting.flag]
        if setting.choices is not None:
            assert tuple(action.choices) == setting.choices
    assert _estimator(_train_parser().parse_args([])).get_params() == {
        **STPM().get_params(),
        "strides": [8, 16, 32],  # a flag's values come as a list
    }
    changed = _train_parser().parse_args(
        ["--lr", "0.1", "--resize", "letterbox", "--image-model", "none", "--hard-quantile",
         "none", "--image-size", "64", "96", "--share-stem", "--epochs", "3"]
    )  # fmt: skip
    params = _estimator(changed).get_params()
    assert (params["learning_rate"], params["resize_mode"], params["image_model"]) == (
        0.1,
        "letterbox",
        None,
    )
    assert (params["hard_quantile"], params["image_size"], params["share_stem"]) == (
        None,
        [64, 96],
        True,
    )
    assert params["epochs"] == 3


def test_config_json_and_the_model_file_record_every_setting(trained):
    model, run_dir = trained
    used = settings.as_used(model.get_params())
    config = json.loads((run_dir / "config.json").read_text())
    for setting in settings.SETTINGS:
        if setting.name not in AS_USED:
            assert config[setting.name] == used[setting.name], setting.name
    assert config["device"] == "cpu" and config["threads"] >= 1
    state = torch.load(run_dir / "model.pt", weights_only=True)
    described = {s.name for s in settings.SETTINGS if s.described}
    assert set(settings.BY_NAME) - described == UNDESCRIBED
    for setting in settings.SETTINGS:
        if setting.described is None:
            continue
        where, _, key = setting.described.rpartition(".")
        value = (state[where] if where else state)[key]
        if setting.name == "share_stem":
            value = bool(value)  # the file names the shared modules
        assert value == used[setting.name], setting.name


def test_older_files_are_read_with_what_they_were_trained_with():
    """What models before 0.2 were trained with, as the files of those versions lack it: from
    the settings' `before`, by where the description keeps each (tests/test_reference.py loads
    such files)."""
    assert BEFORE == {
        "resize_mode": "squash",
        "distance": "cosine",
        "image_model": None,
        "student_kind": "same",
        "max_false_alarms": None,
        "settings.denoise": 0.0,
        "settings.hard_quantile": None,
        "settings.selection": "loss",
    }
    in_settings = {s.name for s in settings.SETTINGS if (s.described or "").startswith("settings.")}
    assert {item.name for item in fields(settings.TrainSettings)} == in_settings


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"image_model": "pca"}, {"selection": "best"}])
def test_a_value_outside_a_settings_range_is_refused(bad):
    with pytest.raises(StpmError, match="must"):
        settings.check({**STPM().get_params(), **bad})
