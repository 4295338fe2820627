"""vlcache: process an image once with a vision-language model, answer many prompts from the saved state."""

__version__ = "0.1.0"

__all__ = ["Answer", "Delta", "Engine", "ImageState", "VlcacheError", "__version__"]


def __getattr__(name):
    # Lazy, so that `import vlcache.cli` (argument parsing, --help) does not import torch and transformers.
    if name in ("Answer", "Delta", "Engine"):
        from . import engine

        return getattr(engine, name)
    if name == "ImageState":
        from .state import ImageState

        return ImageState
    if name == "VlcacheError":
        from .errors import VlcacheError

        return VlcacheError
    raise AttributeError(f"module 'vlcache' has no attribute {name!r}")
