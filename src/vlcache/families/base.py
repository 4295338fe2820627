"""The one interface every model family implements: prompt inputs, positions, the image prefill, identity.

The engine, the file format, batching, conversations and the server go through a Family and never look at
model_type themselves. A family computes positions explicitly for every forward: nothing is taken from
state kept on the model object (M-RoPE models keep `rope_deltas` there, stale after another image).
"""

from __future__ import annotations

import torch

from ..pieces import in_pieces, vision_blocks

FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"
CHUNKED = "chunked_attention"  # chunked local attention (Llama 4): a query sees keys of its own chunk only
SHARED = "shared_attention"  # "shared_attention:<i>": reads layer i's K/V, keeps none of its own (Gemma 4)
DEFAULT_VIDEO_FPS = 2.0


class Family:
    name = "base"
    model_types: tuple[str, ...] = ()

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.text_config = model.config.get_text_config()

    @classmethod
    def refuse(cls, config) -> str | None:
        """Why vlcache cannot be exact for a model of this config (checked before its weights load); None: it can."""
        return None

    # -- identity ------------------------------------------------------------------------------------------------

    def layer_kinds(self) -> list[str]:
        """Per text layer: FULL, SLIDING, CHUNKED or LINEAR (what its state is, and so what a file stores for it)."""
        kinds = getattr(self.text_config, "layer_types", None) or [FULL] * self.text_config.num_hidden_layers
        return [kind if kind in (FULL, SLIDING, LINEAR) else FULL for kind in kinds]

    def kv_shapes(self) -> list[tuple[int, int]]:
        """Per text layer: (kv_heads, head_dim) of its K/V."""
        return kv_shapes(self.text_config)

    def attention_chunk(self) -> int | None:
        """The chunk size of CHUNKED layers (None: the model has none)."""
        return None

    def sliding_window(self) -> int | None:
        """The window of SLIDING layers (None: the model has none): a state holds their last window - 1 tokens."""
        return getattr(self.text_config, "sliding_window", None) if SLIDING in self.layer_kinds() else None

    @property
    def has_linear_layers(self) -> bool:
        """Linear-attention layers keep a fixed-size state that cannot be cut back or padded into."""
        return LINEAR in self.layer_kinds()

    def linear_state_shapes(self) -> tuple[tuple, tuple]:
        """A linear-attention layer's (conv, recurrent) state shapes without the batch dimension. Here Gated
        DeltaNet's (Qwen3.5): a conv over q, k and v, and a recurrent state per value head."""
        cfg = self.text_config
        k_heads, v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        k_dim, v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        return (2 * k_heads * k_dim + v_heads * v_dim, cfg.linear_conv_kernel_dim), (v_heads, k_dim, v_dim)

    def images_kwargs(self, max_pixels: int | None) -> dict:
        """Processor arguments for `max_pixels` (empty: the processor's own settings)."""
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        return {}

    def processor_settings(self, max_pixels: int | None) -> dict:
        """What decides an image's tokens besides its pixels (sizes, tiling, splitting): part of a state's identity."""
        raise NotImplementedError

    def image_tokens(self, width: int, height: int, images_kwargs: dict) -> int | None:
        """How many tokens the image becomes (for the memory check before the vision encoder); None if unknown."""
        try:
            counts = self.processor._get_num_multimodal_tokens(image_sizes=[[height, width]], **images_kwargs)
            return int(_field(counts, "num_image_tokens")[0])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            return None

    def prepare_image(self, image, max_pixels: int | None):
        """The image as the processor gets it. Families whose processor has no pixel limit downscale here."""
        return image

    # -- the image prefill -----------------------------------------------------------------------------------

    def prefix_inputs(self, text: str, images: list, videos: list, images_kwargs: dict):
        """Tokenized template text with every image and video expanded into its tokens, and the vision tensors.
        Videos come as vlcache.video.LoadedVideo: frames already sampled, with their metadata (timestamps)."""
        return self.processor(text=[text], return_tensors="pt", **self.media_kwargs(images, videos, images_kwargs))

    def media_kwargs(self, images: list, videos: list, images_kwargs: dict) -> dict:
        kwargs: dict = {"images_kwargs": images_kwargs}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs.update(videos=[v.frames for v in videos], video_metadata=[v.metadata() for v in videos],
                          do_sample_frames=False)
            if getattr(self.processor.video_processor, "cap_pixels_per_frame", False) is None:
                kwargs["cap_pixels_per_frame"] = False  # transformers' default, said out loud (it warns otherwise)
        return kwargs

    def encode_after(self, before: str, text: str) -> torch.Tensor:
        """Token ids [1, n] of template `text` as the whole conversation's tokenization gives them after `before`
        (the text a state covers): tokenized in context, not alone (see prompt.encode_in_context)."""
        from ..prompt import encode_in_context

        return encode_in_context(self.processor, before, text)

    # -- videos ----------------------------------------------------------------------------------------------

    takes_video = False  # families whose video path vlcache runs and tests

    def video_fps(self, fps: float | None) -> float:
        """Frames sampled per second: `fps`, else the video processor's own, else 2 (what Qwen's reference
        sampler, qwen-vl-utils, uses; Qwen2-VL's processor names none and would keep every frame)."""
        return fps or getattr(self.processor.video_processor, "fps", None) or DEFAULT_VIDEO_FPS

    def video_indices(self, info, fps: float | None, max_frames: int | None) -> list[int]:
        """Which source frames to sample: the model's own video processor decides (its sample_frames with
        its min and max frames) at video_fps(fps); `max_frames` caps the count."""
        from transformers.video_utils import VideoMetadata

        vp = self.processor.video_processor
        meta = VideoMetadata(total_num_frames=info.total_frames, fps=info.fps, width=info.width, height=info.height,
                             duration=info.duration)
        indices = [int(i) for i in vp.sample_frames(meta, fps=self.video_fps(fps))]
        if max_frames is not None and len(indices) > max_frames:
            indices = [int(i) for i in vp.sample_frames(meta, num_frames=max_frames)]
        return sorted(set(indices))

    def video_settings(self, fps: float | None, max_frames: int | None) -> dict:
        """What decides a video's frames and tokens besides its content: part of a state's identity."""
        vp = self.processor.video_processor
        settings = {"fps": self.video_fps(fps), "max_frames": max_frames}
        for name in ("min_frames", "max_frames", "size", "patch_size", "temporal_patch_size", "merge_size",
                     "image_mean", "image_std", "cap_pixels_per_frame"):
            settings[f"processor_{name}"] = _plain(getattr(vp, name, None))
        return settings

    def video_tokens(self, frames: int, width: int, height: int) -> int | None:
        """How many tokens `frames` sampled frames become (for the memory check before decoding)."""
        try:
            counts = self.processor._get_num_multimodal_tokens(video_sizes=[[frames, height, width]])
            return int(_field(counts, "num_video_tokens")[0])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            return None

    def image_token_mask(self, inputs) -> torch.Tensor:
        """[1, n] long: 1 where a prompt token is an image (or video) token."""
        return (inputs["input_ids"] == self.config.image_token_id).long()

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        """Vision encoder and prefill of the prefix into `cache`; returns the position shift after the image."""
        raise NotImplementedError

    extends = False  # whether prefill_steps can start from a state holding the first `start` tokens

    def prefill_steps(self, inputs, cache, dtype: torch.dtype, chunk: int | None, start: int = 0):
        """prefill() as a generator that yields between units of work of at most `chunk` prefix tokens (so a
        server can decode for others in between) and returns the position shift. Here: the one forward,
        paused at each of its vision blocks when `chunk` is given (a large image's encoder would otherwise
        stall running answers for seconds; pausing changes nothing computed); families that can run their
        prefix in pieces override it (and those that set `extends`, from `start` on)."""
        if start:
            raise ValueError(f"{self.name} cannot extend a state")
        if chunk is None:  # no one decodes in between: one unit
            return self.prefill(inputs, cache, dtype)
        return (yield from in_pieces(vision_blocks(self.model), lambda: self.prefill(inputs, cache, dtype)))

    # -- positions -------------------------------------------------------------------------------------------

    def positions(self, slots: torch.Tensor, logical: torch.Tensor, rope_delta: int) -> torch.Tensor:
        """Position ids for tokens at cache `slots` [B, L] whose unpadded sequence index is `logical` [B, L]."""
        raise NotImplementedError


class OneDimPositions:
    """Plain 1D RoPE: a token's position is its unpadded sequence index; `max_pixels` downscales the image."""

    def positions(self, slots: torch.Tensor, logical: torch.Tensor, rope_delta: int) -> torch.Tensor:
        return logical

    def prepare_image(self, image, max_pixels: int | None):
        if max_pixels is None or image.width * image.height <= max_pixels:
            return image
        from PIL import Image

        scale = (max_pixels / (image.width * image.height)) ** 0.5
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)


def kv_shapes(text_config) -> list[tuple[int, int]]:
    """Per text layer: (kv_heads, head_dim) of its K/V, from transformers' per-layer view of the config (layers
    may differ: Gemma 4's full-attention layers have their own head size and head count)."""
    out = []
    for layer in text_config.per_layer_config:
        dim = getattr(layer, "head_dim", None) or layer.hidden_size // layer.num_attention_heads
        out.append((layer.num_key_value_heads, dim))
    return out


def _plain(value):
    """A processor setting as plain JSON data (transformers keeps sizes as SizeDict dataclasses)."""
    import dataclasses

    if dataclasses.is_dataclass(value):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    return dict(value) if isinstance(value, dict) else value


def _field(counts, name: str):
    """A field of transformers' MultiModalData (an object in 5.x, a dict before)."""
    return counts[name] if isinstance(counts, dict) else getattr(counts, name)


def run_steps(steps):
    """Run a generator of units of work (prefill_steps) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
