"""The run folder: what `stpm-train` writes and every other command reads.

    <run>/model.pt         everything prediction needs (stpm.modelfile), written at the end
    <run>/config.json      every setting used, the data folder, the validation images, timings
    <run>/loss_curve.png   training and validation loss per epoch, the kept epoch marked
    <run>/checkpoint.pt    after every epoch: what `stpm-train --resume` continues from

Every file is written atomically: a crash leaves the old file or the new one.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from . import settings
from .errors import StpmError
from .files import atomic_write, atomic_write_text
from .modelfile import ModelDescription, load_untrusted, write_model_file

MODEL, CONFIG, CHECKPOINT, LOSS_CURVE = "model.pt", "config.json", "checkpoint.pt", "loss_curve.png"
RUNS = Path("runs")  # where new runs go, and where the newest model is looked for
CATEGORY_RUNS = RUNS / "categories"  # one run per category: stpm-train --category a b c


def write_checkpoint(run_dir: Path, state: dict) -> Path:
    """The training loop's state after an epoch, with what the estimator needs to go on."""
    import torch

    return atomic_write(run_dir / CHECKPOINT, lambda temporary: torch.save(state, temporary))


def read_checkpoint(run_dir: str | Path) -> dict:
    """A run's checkpoint; its "estimator" parameters completed with what older runs used."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise StpmError(f"no checkpoint to resume in {run_dir} (expected {path})")
    state = load_untrusted(path, "checkpoint")
    state["estimator"] = {**settings.before_they_existed(), **state["estimator"]}
    return state


def write_run(
    run_dir: Path,
    description: ModelDescription,
    weights: tuple[dict, dict | None],
    params: dict,
    extra: dict,
) -> None:
    """model.pt (description and weights: the student's, the image model's), config.json and
    loss_curve.png. config.json holds the data folder, every setting by its name as the model
    used it (params: the estimator's; stpm.settings.as_used), what training found (the
    teacher's source, the validation scores, the threshold...) and extra (where and how long it
    trained: device and threads as used)."""
    from . import visualize

    run_dir.mkdir(parents=True, exist_ok=True)
    write_model_file(run_dir / MODEL, description, *weights)
    found = description.to_dict()
    for key in ("history", "settings", *(s.described for s in settings.SETTINGS)):
        found.pop(key, None)
    found["shared_layers"] = description.shared_layers  # which modules: more than share_stem
    config = {
        "data": extra.pop("data"),
        **settings.as_used(params),
        **found,
        **extra,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=2) + "\n")
    visualize.plot_loss_curve(description.history, run_dir / LOSS_CURVE, description.best_epoch)


def run_state(run_dir: Path) -> str:
    """'finished' (model.pt written), 'interrupted' (a checkpoint only) or 'new'."""
    if (run_dir / MODEL).is_file():
        return "finished"
    return "interrupted" if (run_dir / CHECKPOINT).is_file() else "new"


def new_run_dir(category: str, root: Path = RUNS) -> Path:
    """root/<category>/<timestamp>, with a suffix if that exists already."""
    base = root / category / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    return run_dir


def latest_model(root: Path = RUNS) -> Path:
    """The newest root/**/model.pt, for `stpm-predict image.png` right after `stpm-train`."""
    models = sorted(root.glob(f"**/{MODEL}"), key=lambda path: path.stat().st_mtime)
    if not models:
        raise StpmError(
            f"no trained model under {root}/; train one with stpm-train or pass --model"
        )
    return models[-1]


def recorded_data(model_path: Path) -> Path:
    """The data folder the config.json beside a model file records (its training images)."""
    config = model_path.parent / CONFIG
    recorded = json.loads(config.read_text()).get("data") if config.is_file() else None
    if recorded is None:
        raise StpmError(
            f"name the images to calibrate and check on (--data PATH or --category NAME): "
            f"{model_path} has no config.json beside it that records its data folder"
        )
    if not Path(recorded).is_dir():
        raise StpmError(
            f"{config} records the data folder {recorded}, which is not here; pass --data PATH"
        )
    return Path(recorded)
