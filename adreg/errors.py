"""User-facing errors.

Everything a user can get wrong (paths, images, names, options) raises an ``AdregError`` with a
message that says what is wrong and what to do; the CLI prints it without a traceback.
"""


class AdregError(Exception):
    """Base class of errors caused by input or environment, not by a bug."""


class DataError(AdregError):
    """A folder, image or mask that cannot be used as given."""


class ImageDecodeError(DataError):
    """Bytes or a file that are not a readable image."""


class BackboneError(AdregError):
    """A backbone that cannot be built or loaded (typically: weights not reachable offline)."""


class RegistryError(AdregError):
    """An unknown category, alias or version in the model registry."""


class ConfigError(AdregError):
    """An option value that makes no sense."""
