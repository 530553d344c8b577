"""Model zoo behind one feature API (see base.py). One file per family; importing it registers its models."""
from kdbench.models.base import TapModel, count_parameters, probe_taps
from kdbench.models.registry import MODELS, create_model, list_models, register_model
from kdbench.models import lenet, mlp, resnet_cifar  # noqa: F401  (registration)

__all__ = ["TapModel", "MODELS", "count_parameters", "create_model", "list_models", "probe_taps", "register_model"]
