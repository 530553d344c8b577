"""torchvision ImageNet models behind the feature API: tv_resnet18, tv_resnet34, tv_resnet50, tv_mobilenet_v2.

The torchvision network is built by torchvision itself (`weights` is passed through, default None: random init,
nothing downloaded) and its top-level children become this model's children, so `state_dict()` keys are exactly
torchvision's and its checkpoints load as they are. The forward is torchvision's; taps are declared by module path
and read through forward hooks (registered for the requested taps only, removed after each call):

  tv_resnet*       stem = `relu` output (after conv1-bn1-ReLU, before the max-pool), stage1..4 = `layer1..4`
                   outputs, embedding = the input of `fc` (pooled), logits
  tv_mobilenet_v2  stem = `features.0`, stage1..4 = `features.3`, `.6`, `.13`, `.17` (the last inverted-residual
                   block at 1/4, 1/8, 1/16 and 1/32 resolution; linear-bottleneck outputs, no ReLU),
                   embedding = the input of `classifier` (pooled 1280), logits
  tv_resnet*       stage1_pre..stage4_pre = the residual sum of each stage's last block before its final ReLU
                   (stageN = ReLU(stageN_pre)): what the ImageNet code of OFD, ReviewKD and mdistiller distils (their
                   ResNets return the last block's output before the ReLU: mdistiller models/imagenet/resnet.py
                   preact_feats, ReviewKD ImageNet/models/resnet.py is_last). torchvision's block applies that ReLU
                   in place through its one `relu` module (also called after bn1 / bn2 inside the block), so the
                   tap is a copy of the input of that module's last call in the block (a forward pre-hook; the copy
                   keeps the pre-activation values and the gradient path to them). tv_mobilenet_v2 has none.
bn_before_relu(): the last BN of each stage's last block (bn2 / bn3 for ResNets, like the CIFAR ResNets; the
linear-bottleneck BN for MobileNetV2, like the CIFAR MobileNetV2).
"""
from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence

from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model


def _store_output(store: dict, name: str, module, inputs, output):
    store[name] = output


def _store_input(store: dict, name: str, module, inputs):
    store[name] = inputs[0]


def _store_input_copy(store: dict, name: str, module, inputs):
    """A copy of the module's input at each call (the last call's stays): the input of an in-place ReLU."""
    store[name] = inputs[0].clone()


class TorchvisionTapModel(TapModel):
    def __init__(self, net: nn.Module, taps: Mapping[str, tuple[str, str]], stage_names: Sequence[str],
                 bn_paths: Sequence[str]):
        """taps: tap name -> (module path, "output" | "input" | "last_input"); "last_input" keeps a copy of the input of
        the module's last call in the forward. bn_paths: module paths of bn_before_relu()."""
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        # torchvision's forward runs on the shared children; kept out of _modules so nothing is registered twice
        self.__dict__["_net"] = net
        self._tap_paths = dict(taps)
        self._bn_paths = tuple(bn_paths)
        self.stage_names = tuple(stage_names)
        self.tap_names = (*self._tap_paths, "logits")
        for path, _ in self._tap_paths.values():
            self.get_submodule(path)  # fail at construction on a wrong path

    def train(self, mode: bool = True):
        self._net.training = mode
        return super().train(mode)

    def _forward_taps(self, x, taps):
        captured: dict = {}
        handles = []
        try:
            for tap in sorted(taps - {"logits"}):
                path, where = self._tap_paths[tap]
                module = self.get_submodule(path)
                if where == "output":
                    handles.append(module.register_forward_hook(partial(_store_output, captured, tap)))
                elif where == "last_input":
                    handles.append(module.register_forward_pre_hook(partial(_store_input_copy, captured, tap)))
                else:
                    handles.append(module.register_forward_pre_hook(partial(_store_input, captured, tap)))
            logits = self._net(x)
        finally:
            for handle in handles:
                handle.remove()
        captured["logits"] = logits
        return captured

    def bn_before_relu(self):
        return [self.get_submodule(path) for path in self._bn_paths]


_RESNET_TAPS = {"stem": ("relu", "output"), "stage1": ("layer1", "output"), "stage2": ("layer2", "output"),
                "stage3": ("layer3", "output"), "stage4": ("layer4", "output"), "embedding": ("fc", "input")}
_MOBILENET_STAGES = (3, 6, 13, 17)
_MOBILENET_TAPS = {"stem": ("features.0", "output"),
                   **{f"stage{i}": (f"features.{b}", "output") for i, b in enumerate(_MOBILENET_STAGES, start=1)},
                   "embedding": ("classifier", "input")}
_STAGES4 = ("stage1", "stage2", "stage3", "stage4")


def _check_input(name: str, input_shape: Sequence[int]) -> None:
    if input_shape[0] != 3:
        raise ValueError(f"{name} expects 3-channel inputs, got input_shape {tuple(input_shape)}")


def _build(builder: str, weights, num_classes: int, **kwargs) -> nn.Module:
    import torchvision  # lazily: importing kdbench.models stays cheap

    return getattr(torchvision.models, builder)(weights=weights, num_classes=num_classes, **kwargs)


def _resnet_taps(net: nn.Module) -> dict:
    """_RESNET_TAPS plus stageN_pre: the input of the last call of layerN's last block's (in-place) `relu`."""
    taps = dict(_RESNET_TAPS)
    for i in range(1, 5):
        taps[f"stage{i}_pre"] = (f"layer{i}.{len(getattr(net, f'layer{i}')) - 1}.relu", "last_input")
    return taps


def _register_resnet(name: str, builder: str, last_bn: str) -> None:
    def factory(num_classes, input_shape, weights=None, **kwargs):
        _check_input(name, input_shape)
        net = _build(builder, weights, num_classes, **kwargs)
        return TorchvisionTapModel(net, _resnet_taps(net), _STAGES4, [f"layer{i}.{len(getattr(net, f'layer{i}')) - 1}."
                                                                        f"{last_bn}" for i in range(1, 5)])

    factory.__doc__ = f"torchvision {builder} (weights passed to torchvision; default None)"
    register_model(name)(factory)


_register_resnet("tv_resnet18", "resnet18", "bn2")
_register_resnet("tv_resnet34", "resnet34", "bn2")
_register_resnet("tv_resnet50", "resnet50", "bn3")


@register_model("tv_mobilenet_v2")
def tv_mobilenet_v2(num_classes, input_shape, weights=None, **kwargs):
    """torchvision mobilenet_v2 (weights passed to torchvision; default None)."""
    _check_input("tv_mobilenet_v2", input_shape)
    net = _build("mobilenet_v2", weights, num_classes, **kwargs)
    bn_paths = [f"features.{b}.conv.{len(net.features[b].conv) - 1}" for b in _MOBILENET_STAGES]
    return TorchvisionTapModel(net, _MOBILENET_TAPS, _STAGES4, bn_paths)
