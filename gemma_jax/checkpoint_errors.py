"""Named errors of checkpoint conversion and loading: each says what is wrong and how to fix it.

All derive from `CheckpointError` (a ValueError), so `except CheckpointError` catches any bad input.
The tensor-table errors also derive from `params.ParamMappingError`.
"""

from __future__ import annotations

from gemma_jax.params import ParamMappingError


class CheckpointError(ValueError):
    """A checkpoint (source or destination) cannot be converted or loaded as asked."""


class SourceError(CheckpointError):
    """The source is not a directory or hub id holding an HF safetensors checkpoint."""


class HubDownloadError(SourceError):
    """A hub id could not be downloaded (offline, unknown repo or revision, no access)."""


class MissingConfigError(SourceError):
    """The source has no config.json."""


class UnsupportedModelError(SourceError):
    """config.json describes a model_type this package does not implement."""


class CorruptSafetensorsError(SourceError):
    """A safetensors file or index is truncated, corrupt or missing."""


class MissingTensorError(CheckpointError, ParamMappingError):
    """Tensors the config requires are absent from the checkpoint."""


class UnexpectedTensorError(CheckpointError, ParamMappingError):
    """The checkpoint holds tensors the config does not account for."""


class ShapeMismatchError(CheckpointError, ParamMappingError):
    """A tensor's shape differs from the one config.json implies."""


class DestinationExistsError(CheckpointError):
    """The output path exists and overwriting was not asked for."""


class NotACheckpointError(CheckpointError):
    """The path is not a complete gemma_jax checkpoint (absent, or an interrupted conversion)."""


class InvalidConfigError(SourceError):
    """config.json holds values that do not describe a valid model (e.g. layer_types of the wrong length)."""


class OverwriteRefusedError(DestinationExistsError):
    """--overwrite was asked for a path it may not replace: not a checkpoint of the kind written, or the source."""


class DestinationNotWritableError(CheckpointError):
    """The output path cannot be created: a parent is a file, or is not writable."""
