"""Exceptions with one-line messages that say what is wrong and what to do."""


class EmbeddingGemmaError(Exception):
    """Base class for this package's errors."""


class ModelNotFoundError(EmbeddingGemmaError, FileNotFoundError):
    """No source could provide the requested model."""


class WeightsError(EmbeddingGemmaError, ValueError):
    """A checkpoint is incomplete, mis-shaped, of the wrong kind, or fails its hash check."""


class ConfigError(EmbeddingGemmaError, ValueError):
    """A config.json describes a model this package does not implement."""


class FileFormatError(EmbeddingGemmaError, ValueError):
    """A file is not what it should be (not JSON, the wrong JSON type, ...): the message names it."""


class InputError(EmbeddingGemmaError, ValueError):
    """An input cannot be read at all (missing file, missing column, unknown format, given twice)."""


class BadRecordError(EmbeddingGemmaError, ValueError):
    """A malformed record where bad records are fatal: names the file and line."""


class JobError(EmbeddingGemmaError, ValueError):
    """A batch job cannot run as asked (settings clash with an earlier run in its folder, bad topology...)."""


class VerifyError(EmbeddingGemmaError, ValueError):
    """An output folder does not hold every input record exactly once."""
