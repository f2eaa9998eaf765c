"""Exception types of the core: each names the problem in words a user can act on."""

from __future__ import annotations


class VprError(Exception):
    """Base class of every error vpr_ros raises on purpose."""


class ImageError(VprError, ValueError):
    """An image that cannot be used: unreadable, empty, zero-size, bad layout or dtype."""


class TransmissionError(VprError, ValueError):
    """A transmission setting or encoder failure (bad quality, unknown codec, ...)."""


class MapError(VprError):
    """A place map that is missing, corrupt, truncated or of another descriptor dimension."""


class ModelError(VprError):
    """An unknown model name, bad model config, or a checkpoint that does not fit."""


class DatasetError(VprError):
    """A dataset folder or file that is missing or malformed."""


class ConfigError(VprError, ValueError):
    """A configuration key or value that is invalid."""


class OutputError(VprError, OSError):
    """An output file or folder that could not be written (disk full, not a folder, no permission).

    Raised only after the partial output is removed: whatever was at the path before is left as it was.
    """
