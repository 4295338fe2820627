"""Model families: one module each, behind the small interface in base.py. `for_model` picks one."""

from __future__ import annotations

from .base import CHUNKED, FULL, LINEAR, SHARED, SLIDING, Family
from .gemma import Gemma3
from .gemma4 import Gemma4
from .glm import Glm4v
from .internvl import InternVL
from .lfm2 import Lfm2Vl
from .llama4 import Llama4
from .llava import LlavaOnevision
from .mistral import Mistral3
from .paddle import PaddleOcrVl
from .plain import PlainImageText
from .qwen import QwenMRoPE
from .smolvlm import SmolVLM

FAMILIES: tuple[type[Family], ...] = (QwenMRoPE, LlavaOnevision, Gemma3, Glm4v, InternVL, SmolVLM, Mistral3, PaddleOcrVl,
                                     Lfm2Vl, Llama4, Gemma4)
GENERIC: type[Family] = PlainImageText  # unlisted image-text models, once `vlcache check` passed for their weights

__all__ = ["FAMILIES", "GENERIC", "CHUNKED", "FULL", "LINEAR", "SHARED", "SLIDING", "Family", "family_class", "supported_model_types"]


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.model_types]


def family_class(model_type: str | None) -> type[Family] | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None
