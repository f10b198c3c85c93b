"""animal_resnet: a small ResNet (BatchNorm, residual blocks, 12 weight layers) on animal-mnist.

Stem Conv-BN-ReLU (16 ch), then three stages of basic residual blocks (16, 32, 64 channels;
stride 2 with a 1x1 Conv-BN shortcut when the shape changes), global average pool, Gemm.
Writes animal_resnet.onnx, animal_calib.npz, animal_test.npz and animal_resnet.json.

    python models/animal_resnet.py [--out DIR] [--quick]
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import _common

SEED = 0
WIDTHS = (16, 32, 64)
TRAIN = {"epochs": 8, "batch_size": 64, "lr": 4e-3, "weight_decay": 1e-4, "seed": SEED,
         "hflip": True}


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(c_out)))


class BasicBlock(nn.Module):
    """relu(x' + bn(conv(relu(bn(conv(x)))))), x' = x or a 1x1 Conv-BN projection of it."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.branch1 = conv_bn(c_in, c_out, 3, stride)
        self.branch2 = conv_bn(c_out, c_out, 3, 1)
        self.shortcut = (conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch2(torch.relu(self.branch1(x)))
        return torch.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = WIDTHS, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(1, widths[0], 3, 1)
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def main(argv: list[str] | None = None) -> dict:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    _common.make_deterministic(SEED)
    return _common.build_classifier("animal_resnet", ResNet(), _common.animal_splits(), "animal",
                                    TRAIN, _common.ANIMAL_PREPROCESSING, args)


if __name__ == "__main__":
    main()
