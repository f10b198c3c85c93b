"""animal_cnn: a LeNet-style CNN on animal-mnist (28x28 silhouettes of 10 animals), ~0.4 M params.

Two Conv-ReLU-MaxPool blocks, then Gemm-ReLU-Gemm. Writes animal_cnn.onnx, animal_calib.npz,
animal_test.npz and animal_cnn.json (all small enough to commit).

    python models/animal_cnn.py [--out DIR] [--quick]
"""

from __future__ import annotations

from collections import OrderedDict

import torch

import _common

SEED = 0
TRAIN = {"epochs": 12, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": SEED,
         "hflip": True}


def make_model() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 32, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc1=nn.Linear(64 * 7 * 7, 128), relu3=nn.ReLU(),
        fc2=nn.Linear(128, 10),
    ))


def main(argv: list[str] | None = None) -> dict:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    _common.make_deterministic(SEED)
    return _common.build_classifier("animal_cnn", make_model(), _common.animal_splits(), "animal",
                                    TRAIN, _common.ANIMAL_PREPROCESSING, args)


if __name__ == "__main__":
    main()
