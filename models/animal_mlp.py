"""animal_mlp: the classic 784-300-100-10 ReLU MLP (LeNet-300-100) on animal-mnist.

The (N,1,28,28) input is flattened inside the model, so it shares animal_cnn's data files.
Writes animal_mlp.onnx, animal_calib.npz, animal_test.npz and animal_mlp.json.

    python models/animal_mlp.py [--out DIR] [--quick]
"""

from __future__ import annotations

from collections import OrderedDict

import torch

import _common

SEED = 0
TRAIN = {"epochs": 20, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": SEED,
         "hflip": True}


def make_model() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(), fc1=nn.Linear(28 * 28, 300), relu1=nn.ReLU(),
        fc2=nn.Linear(300, 100), relu2=nn.ReLU(), fc3=nn.Linear(100, 10),
    ))


def main(argv: list[str] | None = None) -> dict:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    _common.make_deterministic(SEED)
    return _common.build_classifier("animal_mlp", make_model(), _common.animal_splits(), "animal",
                                    TRAIN, _common.ANIMAL_PREPROCESSING, args)


if __name__ == "__main__":
    main()
