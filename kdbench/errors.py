"""Errors a user can fix. The CLI prints their message (which names the fix) without a traceback."""


class KDBenchError(Exception):
    """Base class: bad input or environment, reported as one clear message."""


class UnknownName(KDBenchError, LookupError):
    """A model, method, dataset or tap name that is not registered."""


class DataNotFound(KDBenchError):
    """A dataset is missing on disk and cannot be downloaded."""


class IncompatibleModels(KDBenchError):
    """A method cannot serve the chosen teacher/student pair (shapes, widths, missing taps)."""


class NonFiniteLoss(KDBenchError):
    """A loss term became NaN or infinite during training."""


class CorruptCheckpoint(KDBenchError):
    """A checkpoint file cannot be read, or its content does not match its recorded hash."""


class OutputNotWritable(KDBenchError):
    """The output directory cannot be created or written."""


class ConfigChanged(KDBenchError):
    """A job's folder holds a run of another configuration; resuming it would mix the two."""


class InvalidSetting(KDBenchError):
    """A setting out of its range, or an unknown option."""
