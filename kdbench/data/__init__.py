"""Datasets (raw tensors) and loaders (device-side normalisation and replayable augmentation)."""
from kdbench.data.datasets import DATASETS, Split, dataset_label, list_datasets, load_splits, planned_train_size
from kdbench.data.loader import Augment, Batch, DeviceLoader, StreamLoader
from kdbench.data.folders import FolderLoader, FolderSplit  # noqa: E402  (registers imagefolder, imagenet)
from kdbench.data.prepare import Data, prepare_data

__all__ = ["DATASETS", "Augment", "Batch", "Data", "FolderLoader", "FolderSplit", "DeviceLoader", "Split", "StreamLoader", "dataset_label",
           "list_datasets", "load_splits", "planned_train_size", "prepare_data"]
