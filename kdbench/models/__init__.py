"""Model zoo behind one feature API (see base.py). One file per family; importing it registers its models."""
from kdbench.models.base import TapModel, count_parameters, probe_taps
from kdbench.models.registry import MODELS, create_model, list_models, register_model
from kdbench.models import (  # noqa: F401  (registration)
    imagenet, lenet, mlp, mobilenetv1, mobilenetv2, resnet_cifar, resnetv2, shufflenetv1, shufflenetv2, takd_cnn, vgg, wrn,
)
from kdbench.models.reference import load_reference_checkpoint

__all__ = ["TapModel", "MODELS", "count_parameters", "create_model", "list_models", "load_reference_checkpoint",
           "probe_taps", "register_model"]
