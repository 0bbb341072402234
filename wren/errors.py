"""The one family of errors a user can cause; the CLI prints them without a traceback."""


class WrenError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ModelNotFoundError(WrenError):
    """A path or model name that does not exist."""


class ModelFormatError(WrenError):
    """A file that is corrupt, truncated or not the format it claims to be."""


class UnsupportedModelError(WrenError):
    """A well-formed file of an architecture or tensor type wren does not run."""


class ContextLengthError(WrenError):
    """A prompt (plus what is asked to generate) longer than the context."""


class BadOptionError(WrenError):
    """An option with a value outside its range or of the wrong type."""
