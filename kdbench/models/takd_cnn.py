"""Plain CNNs of TAKD (Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant").

Every conv is 3x3 pad 1 (with bias) + BN + ReLU; MP is a 2x2 max-pool; every FC but the last is followed by ReLU.
The layer lists are those of the authors' `model_factory.py` (`plane_cifar10_book` / `plane_cifar100_book`), built
the same way (`ConvNetMaker`): one Sequential `conv_layers` [Conv, BN, ReLU | MaxPool ...] and one Sequential
`fc_layers` [Linear, ReLU, ..., Linear], so state-dict keys equal the authors' checkpoints. PyTorch default init.

  plain_cnn_2   Conv16-MP-Conv16-MP-FC
  plain_cnn_4   Conv16x2-MP-Conv32x2-MP-FC
  plain_cnn_6   Conv16x2-MP-Conv32x2-MP-Conv64x2-MP-FC
  plain_cnn_8   Conv16x2-MP-Conv32x2-MP-Conv64x2-MP-Conv128x2-MP-FC64-FC
  plain_cnn_10  Conv32x2-MP-Conv64x2-MP-Conv128x2-MP-Conv256x4-MP-FC128-FC
  plain_cnn_N_c100, the CIFAR-100 book:
    2   Conv32-MP-Conv32-MP-FC
    4   Conv32x2-MP-Conv64x2-MP-FC
    6   Conv32x2-MP-Conv64x2-MP-Conv128x2-FC            (no final max-pool in the authors' list: FC on 128x8x8)
    8   Conv32x2-MP-Conv64x2-MP-Conv128x2-MP-Conv256x2-MP-FC64-FC
    10  Conv32x2-MP-Conv64x2-MP-Conv128x2-MP-Conv256x4-MP-FC512-FC

The last FC has `num_classes` outputs (the books write FC10 / FC100; TAKD picks the CIFAR-10 book when
num_classes == 10 and the CIFAR-100 book otherwise; here the book is chosen by name). The first FC's input size
follows from `input_shape` (TAKD hard-codes 32x32x3).

Taps (kdbench's choice; TAKD distils logits only): each run of convs between max-pools is a stage; stageK is the
output of its last conv's ReLU (before the max-pool), stageK_pre that conv's BN output (before the ReLU), and
bn_before_relu() returns those BNs. embedding is the input of the last Linear (the flattened conv output, or the
hidden FC's ReLU output for sizes 8 and 10). There is no stem tap.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model

CIFAR10_BOOK: dict[int, list[str]] = {
    2: ["Conv16", "MaxPool", "Conv16", "MaxPool", "FC10"],
    4: ["Conv16", "Conv16", "MaxPool", "Conv32", "Conv32", "MaxPool", "FC10"],
    6: ["Conv16", "Conv16", "MaxPool", "Conv32", "Conv32", "MaxPool", "Conv64", "Conv64", "MaxPool", "FC10"],
    8: ["Conv16", "Conv16", "MaxPool", "Conv32", "Conv32", "MaxPool", "Conv64", "Conv64", "MaxPool",
        "Conv128", "Conv128", "MaxPool", "FC64", "FC10"],
    10: ["Conv32", "Conv32", "MaxPool", "Conv64", "Conv64", "MaxPool", "Conv128", "Conv128", "MaxPool",
         "Conv256", "Conv256", "Conv256", "Conv256", "MaxPool", "FC128", "FC10"],
}

CIFAR100_BOOK: dict[int, list[str]] = {
    2: ["Conv32", "MaxPool", "Conv32", "MaxPool", "FC100"],
    4: ["Conv32", "Conv32", "MaxPool", "Conv64", "Conv64", "MaxPool", "FC100"],
    6: ["Conv32", "Conv32", "MaxPool", "Conv64", "Conv64", "MaxPool", "Conv128", "Conv128", "FC100"],
    8: ["Conv32", "Conv32", "MaxPool", "Conv64", "Conv64", "MaxPool", "Conv128", "Conv128", "MaxPool",
        "Conv256", "Conv256", "MaxPool", "FC64", "FC100"],
    10: ["Conv32", "Conv32", "MaxPool", "Conv64", "Conv64", "MaxPool", "Conv128", "Conv128", "MaxPool",
         "Conv256", "Conv256", "Conv256", "Conv256", "MaxPool", "FC512", "FC100"],
}


class PlainCNN(TapModel):
    def __init__(self, layers: Sequence[str], num_classes: int, input_shape: Sequence[int]):
        super().__init__()
        d, h, w = input_shape
        conv: list[nn.Module] = []
        fc: list[nn.Module] = []
        self._stage_ends: dict[int, int] = {}  # index of a stage's last BN in conv_layers -> stage number
        n_fc = sum(1 for layer in layers if layer.startswith("FC"))
        size = d * h * w
        for layer in layers:
            if layer.startswith("Conv"):
                filters = int(layer[4:])
                conv += [nn.Conv2d(d, filters, 3, padding=1), nn.BatchNorm2d(filters), nn.ReLU()]
                d = filters
                size = d * h * w
            elif layer.startswith("MaxPool"):
                conv.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
                size = d * h * w
            elif layer.startswith("FC"):
                n_fc -= 1
                width = num_classes if n_fc == 0 else int(layer[2:])
                fc += [nn.Linear(size, width)] + ([] if n_fc == 0 else [nn.ReLU(inplace=True)])
                size = width
            else:
                raise ValueError(f"unknown layer spec {layer!r}")
        # a stage ends at the conv followed by a max-pool or by the end of the conv stack
        for i, module in enumerate(conv):
            if isinstance(module, nn.BatchNorm2d) and (i + 2 == len(conv) or isinstance(conv[i + 2], nn.MaxPool2d)):
                self._stage_ends[i] = len(self._stage_ends) + 1
        self.conv_layers = nn.Sequential(*conv)
        self.fc_layers = nn.Sequential(*fc)
        self.stage_names = tuple(f"stage{k}" for k in self._stage_ends.values())
        self.tap_names = (*self.stage_names, *(f"{s}_pre" for s in self.stage_names), "embedding", "logits")

    def _forward_taps(self, x, taps):
        out = {}
        stage = 0
        for i, module in enumerate(self.conv_layers):
            x = module(x)
            if i in self._stage_ends:
                stage = self._stage_ends[i]
                out[f"stage{stage}_pre"] = x
            elif i - 1 in self._stage_ends:
                out[f"stage{stage}"] = x
        x = x.flatten(1)
        for module in self.fc_layers[:-1]:
            x = module(x)
        out["embedding"] = x
        out["logits"] = self.fc_layers[-1](x)
        return out

    def bn_before_relu(self):
        return [self.conv_layers[i] for i in self._stage_ends]


def _register(name: str, layers: list[str], book: str) -> None:
    def factory(num_classes, input_shape):
        return PlainCNN(layers, num_classes, input_shape)

    factory.__doc__ = f"TAKD plain CNN ({book} book): {'-'.join(layers)}"
    register_model(name)(factory)


for _size in CIFAR10_BOOK:
    _register(f"plain_cnn_{_size}", CIFAR10_BOOK[_size], "CIFAR-10")
    _register(f"plain_cnn_{_size}_c100", CIFAR100_BOOK[_size], "CIFAR-100")
