"""Datasets (raw tensors) and loaders (device-side normalisation and replayable augmentation)."""
from kdbench.data.datasets import DATASETS, Split, list_datasets, load_splits
from kdbench.data.loader import Augment, Batch, DeviceLoader, StreamLoader

__all__ = ["DATASETS", "Augment", "Batch", "DeviceLoader", "Split", "StreamLoader", "list_datasets", "load_splits"]
