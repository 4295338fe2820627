"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 (and its MoE): M-RoPE.

Qwen3.5's text model is a hybrid: 3 of 4 layers are Gated DeltaNet (linear attention) whose state is a
fixed-size conv state and recurrent state, the rest full attention; its position scheme is Qwen3-VL's.

A text token at sequence index i sits at M-RoPE position i + rope_delta after the image (the image's tokens
span fewer positions than tokens); the delta comes from the model's own get_rope_index over the prefix and
travels with every state. Position ids are [4, B, L]: row 0 the cache slot (for the mask), rows 1-3 (t, h, w).
"""

from __future__ import annotations

import copy

import torch

from .base import Family, run_steps


class QwenMRoPE(Family):
    name = "qwen-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")

    # -- identity --------------------------------------------------------------------------------------------

    def images_kwargs(self, max_pixels: int | None) -> dict:
        super().images_kwargs(max_pixels)
        if max_pixels is None:
            return {}
        size = dict(self.processor.image_processor.size)
        return {"size": {"shortest_edge": min(size.get("shortest_edge", max_pixels), max_pixels), "longest_edge": max_pixels}}

    def processor_settings(self, max_pixels: int | None) -> dict:
        ip = self.processor.image_processor
        size = self.images_kwargs(max_pixels).get("size") or dict(ip.size)
        return {
            "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"], "patch_size": ip.patch_size,
            "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
            "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
        }

    def image_tokens(self, width: int, height: int, images_kwargs: dict) -> int:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        size = images_kwargs.get("size") or dict(ip.size)
        factor = ip.patch_size * ip.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return (h // factor) * (w // factor)

    # -- the image prefill -----------------------------------------------------------------------------------

    def image_token_mask(self, inputs) -> torch.Tensor:
        return inputs["mm_token_type_ids"].long()

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        return run_steps(self.prefill_steps(inputs, cache, dtype, None))

    def prefill_steps(self, inputs, cache, dtype: torch.dtype, chunk: int | None):
        """The vision encoder as one unit, then the prefix in pieces of `chunk` tokens, each given the image
        features (and Qwen3-VL's deepstack features) of the image tokens inside it."""
        from ..generate import forward

        ids = inputs["input_ids"]
        vision, deltas = self.model.model.get_rope_index(
            ids, image_grid_thw=inputs["image_grid_thw"], video_grid_thw=None,
            attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        index = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1)
        positions = torch.cat([index, vision.to(ids.device)], dim=0)
        delta = int(deltas.view(-1)[0])
        n = ids.shape[1]
        if chunk is None or n <= chunk:
            forward(self.model, ids, positions, cache, pixel_values=inputs["pixel_values"].to(dtype),
                    image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=inputs["mm_token_type_ids"])
            return delta
        with torch.inference_mode():
            features = self.model.model.get_image_features(inputs["pixel_values"].to(dtype), inputs["image_grid_thw"], return_dict=True)
        yield
        image = inputs["mm_token_type_ids"][0] == 1
        before = torch.cumsum(image.long(), 0) - image.long()  # image tokens before each position
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            first, count = int(before[start]), int(image[start:end].sum())
            outputs = {"image": _slice_features(features, first, first + count)} if count else None
            forward(self.model, ids[:, start:end], positions[..., start:end], cache, mm_encoder_outputs=outputs,
                    mm_token_type_ids=inputs["mm_token_type_ids"][:, start:end])
            if end < n:
                yield
        return delta

    # -- positions -------------------------------------------------------------------------------------------

    def positions(self, slots: torch.Tensor, logical: torch.Tensor, rope_delta: int) -> torch.Tensor:
        rope = logical + rope_delta
        return torch.stack([slots, rope, rope, rope])


def _slice_features(features, start: int, end: int):
    """The vision encoder's output for image tokens start..end (in order), shaped as the model takes it."""
    sliced = copy.copy(features)
    sliced["pooler_output"] = (torch.cat(features.pooler_output, dim=0)[start:end],)
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack is not None:
        sliced["deepstack_features"] = [(torch.cat(level, dim=0)[start:end],) for level in deepstack]
    return sliced
