"""Exceptions with one-line messages that say what is wrong and what to do."""


class EmbeddingGemmaError(Exception):
    """Base class for this package's errors."""


class ModelNotFoundError(EmbeddingGemmaError, FileNotFoundError):
    """No source could provide the requested model."""


class WeightsError(EmbeddingGemmaError, ValueError):
    """A checkpoint is incomplete, mis-shaped, of the wrong kind, or fails its hash check."""


class ConfigError(EmbeddingGemmaError, ValueError):
    """A config.json describes a model this package does not implement."""
