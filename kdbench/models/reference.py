"""Load the KD benchmarks' reference checkpoints (RepDistiller / mdistiller `ckpt_epoch_240.pth`) into kdbench models.

The reference files are dicts with the weights under 'model' (RepDistiller's `save_teacher` also stores 'epoch',
'accuracy', 'optimizer'; mdistiller's downloaded teachers use the same layout). Some were saved from a
`nn.DataParallel`-wrapped network, so every key carries a 'module.' prefix.

Key mapping: the identity. Every kdbench CIFAR model (resnet*, wrn_*, vgg*, ResNet50, ResNet18, MobileNetV2,
ShuffleV1, ShuffleV2) uses the reference module names, so after stripping a leading 'module.' the keys and shapes
equal the reference state dicts (shared/reference/reference_state_dict_keys.json). The only adjustment besides the
prefix: a checkpoint written by an old PyTorch (< 0.4.1) lacks BatchNorm's `num_batches_tracked` buffers; they are
filled with the model's current value (they only matter for BN with momentum=None, which no reference model uses).
"""
from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from kdbench.errors import CorruptCheckpoint, IncompatibleModels

#: prefixes a reference state dict may carry that kdbench models do not (DataParallel / DistributedDataParallel)
STRIP_PREFIXES = ("module.",)
#: the checkpoint keys that may hold the state dict, in order of preference
WEIGHT_KEYS = ("model", "state_dict", "net", "student")  # student: a kdbench run checkpoint


def reference_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The weights of a reference checkpoint with the key mapping applied (prefix stripped)."""
    state = None
    for key in WEIGHT_KEYS:
        value = checkpoint.get(key)
        if isinstance(value, nn.Module):  # a pickled network instead of its state dict
            value = value.state_dict()
        if isinstance(value, Mapping):
            state = value
            break
    if state is None:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            state = checkpoint  # a bare state dict
        else:
            raise CorruptCheckpoint(f"checkpoint holds no state dict (looked for keys {list(WEIGHT_KEYS)} or a plain "
                                    f"state dict; found keys {sorted(map(str, checkpoint))[:8]})")
    out = {}
    for key, value in state.items():
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def load_reference_checkpoint(model: nn.Module, path_or_checkpoint: str | PathLike | Mapping, source: str = "",
                              model_name: str = "") -> nn.Module:
    """Load a RepDistiller/mdistiller checkpoint (a path or an already loaded dict) into `model`, strictly.

    Raises IncompatibleModels naming the file (`source` for a loaded dict), the model (`model_name`, its config
    name), the missing / unexpected keys and the mismatched shapes. Returns the model.
    """
    if isinstance(path_or_checkpoint, (str, PathLike)):
        path = Path(path_or_checkpoint).expanduser()
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"reference checkpoint {path} does not exist") from None
        except Exception as err:  # noqa: BLE001  (pickle/zip errors of many kinds)
            raise CorruptCheckpoint(f"cannot read reference checkpoint {path}: {err}") from None
        source = str(path)
    else:
        checkpoint, source = path_or_checkpoint, source or "the checkpoint"
    state = reference_state_dict(checkpoint)
    own = model.state_dict()
    for key, value in own.items():  # old checkpoints lack BN's num_batches_tracked
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        what = f"model '{model_name}' ({type(model).__name__})" if model_name else type(model).__name__
        raise IncompatibleModels(
            f"{source} does not fit {what}: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}, {len(mismatched)} shape mismatches {mismatched[:3]}. "
            "Check that the architecture (teacher=<model>) matches the checkpoint's.")
    model.load_state_dict(state, strict=True)
    return model
