"""One exception type per failure a user can meet; the CLI prints them as one line."""


class HistocscError(Exception):
    """Base class: a user-facing error whose message names the file and the problem."""


class SlideError(HistocscError):
    """A slide cannot be opened or read (missing, corrupt, unsupported, no pixel size)."""


class ConfigError(HistocscError):
    """A configuration file or option is invalid."""


class DataError(HistocscError):
    """An input table, cohort or tile store is missing or malformed."""


class RegistrationError(HistocscError):
    """Two sections could not be aligned."""


class LabelError(HistocscError):
    """IHC-derived labels cannot be made."""


class ModelError(HistocscError):
    """A model, checkpoint or weights file is missing, invalid or incompatible."""


# "Not found" variants: each is also the builtin FileNotFoundError, so callers can catch either.
class SlideNotFoundError(SlideError, FileNotFoundError):
    """A slide file or folder does not exist."""


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """A configuration file does not exist."""


class DataNotFoundError(DataError, FileNotFoundError):
    """An input table, cohort, tile store or folder does not exist."""


class RegistrationNotFoundError(RegistrationError, FileNotFoundError):
    """A saved transform does not exist."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model, checkpoint or weights file does not exist."""
