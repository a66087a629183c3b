"""Run by tests/test_distributed.py, alone or under torchrun: train a tiny model and save this
rank's student, so that the test can compare the weights of every rank.

usage: python ddp_worker.py DATA OUT [--frozen-batchnorm] [--rank-1-data DATA]
"""

import os
import sys
from pathlib import Path

import torch

from stpm import STPM

SETTINGS = dict(
    image_size=64,
    strides=(4, 8, 16),
    epochs=3,
    batch_size=4,  # 9 training images: a last batch of 1, smaller than two processes
    validation_fraction=0.25,
    seed=0,
    device="cpu",
)

if __name__ == "__main__":
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    if "--rank-1-data" in sys.argv and os.environ.get("RANK") == "1":  # a node with other files
        data = Path(sys.argv[sys.argv.index("--rank-1-data") + 1])
    if "--frozen-batchnorm" in sys.argv:  # BatchNorm as a fixed affine map in training too
        from torch.nn.modules.batchnorm import _BatchNorm

        _BatchNorm.train = lambda self, mode=True: torch.nn.Module.train(self, False)
    model = STPM(**SETTINGS).fit(data, run_dir=out / "run")
    student = model.runtime_.student.state_dict()
    torch.save(student, out / f"rank{os.environ.get('RANK', '0')}.pt")
