"""Errors a user can act on. The CLI prints them as one line, `error: <message>`, and exits 1."""


class VlcacheError(Exception):
    """Base class: anything raised as a VlcacheError is the user's input or environment, not a bug."""


class ImageError(VlcacheError):
    """The image is missing, unreadable, not an image, or too large."""


class VideoError(ImageError):
    """The video is missing, unreadable, not a video, has no frames, or is too large."""


class CacheFileError(VlcacheError):
    """The cache file is missing, empty, truncated, corrupt, foreign, or from a newer format."""


class LayoutError(CacheFileError):
    """The cache file's tensors, by its header, do not fit the model at hand (its layers' kinds or shapes)."""


class ModelMismatchError(VlcacheError):
    """The cache was made with other model weights than the engine holds."""


class ModelLoadError(VlcacheError):
    """The model or its processor could not be loaded."""


class PromptError(VlcacheError):
    """Prompt text that cannot be used as given (the model's control tokens in it, invalid characters)."""
