"""vlcache: process an image once with a vision-language model, answer many prompts from the saved state."""

__version__ = "0.1.0"

__all__ = ["Answer", "Delta", "Engine", "ImageState", "VlcacheError", "__version__"]


def quiet_upstream_notes() -> None:
    """With torchao installed (the quant extra), importing transformers' model code imports it, --quantize or not,
    and this torch logs a deprecation line about torchao's enums on stderr: torchao's to fix, nothing a user can act
    on. Hidden before the engine's modules are imported (the CLI calls this before torch is imported)."""
    import logging

    logging.getLogger("torch.utils._pytree").addFilter(_not_torchao_enum_note)


def _not_torchao_enum_note(record) -> bool:
    return "is an Enum subclass and is now" not in str(record.msg)


def __getattr__(name):
    # Lazy, so that `import vlcache.cli` (argument parsing, --help) does not import torch and transformers.
    if name in ("Answer", "Delta", "Engine"):
        quiet_upstream_notes()
        from . import engine

        return getattr(engine, name)
    if name == "ImageState":
        from .state import ImageState

        return ImageState
    if name == "VlcacheError":
        from .errors import VlcacheError

        return VlcacheError
    raise AttributeError(f"module 'vlcache' has no attribute {name!r}")
