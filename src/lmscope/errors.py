"""One exception family for lmscope: messages a user can act on, printed by the CLI without a traceback."""


class LmscopeError(Exception):
    """Base class of every error lmscope raises on purpose."""


class ModelError(LmscopeError):
    """A model could not be found, loaded or understood."""


class SiteError(LmscopeError):
    """A site name, layer or site kind is invalid for the model at hand."""


class CorpusError(LmscopeError):
    """A corpus is missing, empty or in an unknown format."""


class StoreError(LmscopeError):
    """An activation store is missing, corrupt, or does not match the request."""


class SAEError(LmscopeError):
    """An SAE config, weight file or format is invalid or does not match a model."""


class ConfigError(LmscopeError):
    """A run or suite configuration is invalid."""


class InterventionError(LmscopeError):
    """An intervention or attribution request names a latent, site or target that does not exist."""


class OutputError(LmscopeError):
    """An output path holds something the command did not write (or is a file where a folder goes)."""


class CircuitError(InterventionError):
    """A replacement model or attribution graph cannot be built from the transcoders at hand."""
