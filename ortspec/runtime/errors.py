"""Every error the runtime raises on purpose, in one place: what a caller may catch, and what each means."""


class PackageError(Exception):
    """A deployment package is missing, malformed, corrupted or unsupported."""


class ContextLengthError(ValueError):
    """A sequence would grow past what the model (or its cache) can hold."""


class ChatTemplateError(ValueError):
    """The package has no chat template, or the template rejected the conversation (or broke a limit)."""


class CalibrationFileError(ValueError):
    """A stored calibration file that cannot be used; it is ignored and measured again."""


class CacheStateError(RuntimeError):
    """Internal error: a cache no longer holds the sequence the decoding loop expects (a bug, never bad input)."""
