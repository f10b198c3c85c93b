"""digits_cnn: a small CNN on scikit-learn's 8x8 digits (1,797 images), the README quick-start model.

Conv-BN-ReLU x2, max-pool, Gemm classifier. Trains in seconds on 2 CPU cores.
Writes digits_cnn.onnx, digits_calib.npz, digits_test.npz and digits_cnn.json (all committed).

    python models/digits_cnn.py [--out DIR] [--quick]
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from sklearn.datasets import load_digits

import _common

SEED = 0
SPLIT = {"train": 1181, "calib": 256, "test": 360}
TRAIN = {"epochs": 30, "batch_size": 64, "lr": 1e-2, "weight_decay": 1e-4, "seed": SEED}


def make_model() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1), bn2=nn.BatchNorm2d(32), relu2=nn.ReLU(),
        pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc=nn.Linear(32 * 4 * 4, 10),
    ))


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    idx = _common.stratified_split(y, SPLIT, SEED)
    return {name: (x[i], y[i]) for name, i in idx.items()}


def main(argv: list[str] | None = None) -> dict:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    _common.make_deterministic(SEED)
    return _common.build_classifier("digits_cnn", make_model(), load_splits(), "digits", TRAIN,
                                    "float32 (N,1,8,8), pixel/16 in [0,1]", args)


if __name__ == "__main__":
    main()
