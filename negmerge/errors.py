"""Errors a user can act on. Each message names the file, key or parameter at fault."""


class NegMergeError(ValueError):
    """Base class for every error the library raises on bad input."""


class CheckpointError(NegMergeError):
    """A checkpoint file is missing, unreadable, unsafe, or does not match the others."""


class MergeError(NegMergeError):
    """A merge was asked for with inputs or parameters it cannot work with."""


class DataError(NegMergeError):
    """A data set, manifest, image or forget-set selection is missing or malformed."""


class DivergedError(NegMergeError):
    """A fine-tuning run diverged: its task vector holds NaN or Inf and must not be merged."""
