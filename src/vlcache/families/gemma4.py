"""Gemma 4 (E2B, E4B, 26B-A4B, 31B): sliding-window layers with a full layer every few, layers that read other
layers' K/V, per-layer embeddings, image tokens that see each other; plain 1D RoPE.

- Shared K/V: the last `num_kv_shared_layers` layers compute no keys or values; each reads those of the last
  earlier layer of its own type (sliding or full), which transformers' cache gives a DummyLayer. A state stores
  nothing for them: the file marks each `shared_attention:<source>` (the layer it reads), and a file whose
  sources are not the model's is refused by its header. In vlcache's decode path the source layer's update
  returns its rows' K/V, and the model hands them on, so the shared layers see each row's own prefix.
- Layers differ in K/V shape: full-attention layers have `global_head_dim` and, with `attention_k_eq_v`
  (values from the key projection, no value projection), `num_global_key_value_heads`. Keys and values still
  differ after their norms and RoPE, so both are stored.
- Image tokens attend to each other both ways in sliding layers (`use_bidirectional_attention="vision"`):
  the image prefill passes `mm_token_type_ids`, from which transformers builds those blocks; questions are
  plain causal. Per-layer embeddings take image tokens as padding; a question's come from its ids.
- The image budget: Gemma 4's processor resizes each image to at most `max_soft_tokens` tokens (70, 140, 280,
  560 or 1120, each pooling_kernel_size^2 patches). `max_pixels` picks the largest budget whose pixels fit
  (below the smallest, the smallest); without it the processor's own (280 in the released models).
- Videos: Gemma 4's video processor samples `num_frames` (32) frames evenly and no frame rate; vlcache does the
  same, taking every frame of a shorter clip (where transformers' sampler raises), or with --fps that many a
  second up to the same cap. Each frame is a timestamped image of `max_soft_tokens` (70) tokens.
- The chat template writes <bos> itself: the processor must not add another.
"""

from __future__ import annotations

import torch

from .base import FULL, SHARED, SLIDING
from .plain import PlainImageText

BUDGETS = (70, 140, 280, 560, 1120)  # the soft-token budgets Gemma 4's image processor accepts


class Gemma4(PlainImageText):
    name = "gemma4"
    model_types = ("gemma4",)
    takes_video = True

    @classmethod
    def refuse(cls, config) -> str | None:
        if config.get_text_config().use_bidirectional_attention == "all":
            return ("its text model attends both ways over all tokens (use_bidirectional_attention='all'): an image's "
                    "state would depend on the question after it, so vlcache cannot cache it")
        return None

    def layer_kinds(self) -> list[str]:
        cfg = self.text_config
        types, modes = cfg.layer_types, cfg.kv_sharing_modes
        sources = {types[i]: i for i, mode in enumerate(modes) if mode == "store"}
        kinds = []
        for i, (kind, mode) in enumerate(zip(types, modes)):
            if mode == "reuse":
                if kind not in sources:  # every layer shared (no layer computes K/V): nothing to cache
                    raise ValueError(f"gemma4 layer {i} reads K/V no layer of this model computes")
                kinds.append(f"{SHARED}:{sources[kind]}")
            else:
                kinds.append(SLIDING if kind == "sliding_attention" else FULL)
        return kinds

    def images_kwargs(self, max_pixels: int | None) -> dict:
        super().images_kwargs(max_pixels)
        if max_pixels is None:
            return {}
        ip = self.processor.image_processor
        per_token = ip.pooling_kernel_size**2 * ip.patch_size**2
        fitting = [b for b in BUDGETS if b * per_token <= max_pixels]
        return {"max_soft_tokens": fitting[-1] if fitting else BUDGETS[0]}

    def prepare_image(self, image, max_pixels: int | None):
        return image  # the processor resizes to the budget images_kwargs picks

    def processor_settings(self, max_pixels: int | None) -> dict:
        return {**super().processor_settings(max_pixels), **self.images_kwargs(max_pixels)}

    def video_indices(self, info, fps: float | None, max_frames: int | None) -> list[int]:
        from transformers.video_utils import VideoMetadata

        vp = self.processor.video_processor
        meta = VideoMetadata(total_num_frames=info.total_frames, fps=info.fps, width=info.width, height=info.height,
                             duration=info.duration)
        count = min(max_frames or vp.num_frames, vp.num_frames, info.total_frames)
        if fps:
            count = min(count, max(1, int(info.total_frames / info.fps * fps)))
        return sorted({int(i) for i in vp.sample_frames(meta, num_frames=count)})

    def video_settings(self, fps: float | None, max_frames: int | None) -> dict:
        vp = self.processor.video_processor
        settings = super().video_settings(fps, max_frames)
        for name in ("num_frames", "max_soft_tokens", "pooling_kernel_size"):  # what decides frames and tokens here
            settings[f"processor_{name}"] = getattr(vp, name, None)
        return settings

    def image_token_mask(self, inputs) -> torch.Tensor:
        kinds = inputs["mm_token_type_ids"]
        return ((kinds == 1) | (kinds == 2)).long()  # image and video soft tokens
