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

from ..pieces import in_pieces, vision_blocks
from .base import Family, run_steps


class QwenMRoPE(Family):
    name = "qwen-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
    takes_video = True
    extends = True

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
        return (inputs["mm_token_type_ids"] > 0).long()  # 1: image tokens, 2: video tokens

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        return run_steps(self.prefill_steps(inputs, cache, dtype, None))

    def prefill_steps(self, inputs, cache, dtype: torch.dtype, chunk: int | None, start: int = 0):
        """The vision encoder one image or video at a time, then the prefix in pieces of `chunk` tokens, each given the image
        and video features (and Qwen3-VL's deepstack features) of the media tokens inside it.

        With `start` > 0 the cache already holds the first `start` tokens (a state that ends after a media
        part): only the media after it go through the encoder and only the tokens after it are computed.
        """
        from ..generate import forward

        ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
        # Positions of the whole prefix from the model's own rope index: images, videos (timestamps between
        # Qwen3-VL's frames are text tokens; Qwen2.5-VL spaces frames by second_per_grid_ts).
        vision, deltas = self.model.model.get_rope_index(
            ids, image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs["attention_mask"],
            mm_token_type_ids=types,
        )
        index = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1)
        positions = torch.cat([index, vision.to(ids.device)], dim=0)
        delta = int(deltas.view(-1)[0])
        n = ids.shape[1]
        if start == 0 and (chunk is None or n <= chunk) and self.one_forward_ok(inputs):  # as generate() does it
            forward(self.model, ids, positions, cache, mm_token_type_ids=types, **_vision_inputs(inputs, dtype))
            return delta
        encoded = {}
        for kind in _KINDS:  # one image or video per unit of work: running answers take a step between them
            if inputs.get(_KINDS[kind][1]) is not None:
                if encoded:
                    yield
                value = yield from self._encode(inputs, kind, dtype, start)
                if value is not None:
                    encoded[kind] = value
        yield
        chunk = chunk or n
        for piece in range(start, n, chunk):
            end = min(n, piece + chunk)
            outputs = self.piece_outputs(encoded, types, piece, end)
            forward(self.model, ids[:, piece:end], positions[..., piece:end], cache, mm_encoder_outputs=outputs or None,
                    mm_token_type_ids=types[:, piece:end])
            if end < n:
                yield
        return delta

    def one_forward_ok(self, inputs) -> bool:
        """Whether the model's own forward takes these media in one call (GLM's cannot mix images and videos)."""
        return True

    def piece_outputs(self, encoded: dict, types: torch.Tensor, piece: int, end: int) -> dict:
        """The encoder outputs of the media tokens in prefix[piece:end], by kind, as the forward takes them."""
        outputs = {}
        for kind, (features, skipped) in encoded.items():
            mine = types[0] == _KINDS[kind][0]
            first, count = int(mine[:piece].sum()) - skipped, int(mine[piece:end].sum())
            if count:
                outputs[kind] = _slice_features(features, first, first + count)
        return outputs

    def _encode(self, inputs, kind: str, dtype: torch.dtype, start: int):
        """(A generator: a unit of work per item and per vision block.) The encoder's output for the `kind` media items whose tokens lie at or after `start`, and how many
        tokens of that kind come before the first of them (None if there are no such items)."""
        code, pixels_name, grid_name = _KINDS[kind]
        grids = inputs[grid_name]
        merge = self.config.vision_config.spatial_merge_size ** 2
        tokens = (grids.prod(-1) // merge).tolist()
        before = int((inputs["mm_token_type_ids"][0, :start] == code).sum())
        skip, skipped = 0, 0
        while skip < len(tokens) and skipped + tokens[skip] <= before:
            skipped += tokens[skip]
            skip += 1
        if skip == len(tokens):
            return None  # all of them are in the state already
        patches = int(grids[:skip].prod(-1).sum())
        encoder = self.model.model.get_image_features if kind == "image" else self.model.model.get_video_features
        # Item by item (the encoder attends within an image, or a video's frame, only), a unit of work between
        # two and between two of an item's vision blocks: the outputs, per item already, are joined as one call
        # over all of them gives them.
        features, pooled, deep, blocks = None, [], None, vision_blocks(self.model)
        for i in range(skip, len(tokens)):
            size = int(grids[i].prod())
            pixels, grid = inputs[pixels_name][patches : patches + size].to(dtype), grids[i : i + 1]
            # One item's encoder call in pieces at its vision blocks (exact: the call is only paused).
            out = yield from in_pieces(blocks, lambda: encoder(pixels, grid, return_dict=True))
            patches += size
            features = features or out
            pooled += list(out.pooler_output)
            levels = getattr(out, "deepstack_features", None)
            if levels is not None:
                deep = [list(level) for level in levels] if deep is None else [d + list(level) for d, level in zip(deep, levels)]
            if i < len(tokens) - 1:
                yield
        features["pooler_output"] = tuple(pooled)
        if deep is not None:
            features["deepstack_features"] = [tuple(level) for level in deep]
        return features, skipped

    # -- positions -------------------------------------------------------------------------------------------

    def positions(self, slots: torch.Tensor, logical: torch.Tensor, rope_delta: int) -> torch.Tensor:
        rope = logical + rope_delta
        return torch.stack([slots, rope, rope, rope])


# mm_token_type_ids code, pixel tensor and grid tensor of each kind of media
_KINDS = {"image": (1, "pixel_values", "image_grid_thw"), "video": (2, "pixel_values_videos", "video_grid_thw")}


def _vision_inputs(inputs, dtype: torch.dtype) -> dict:
    """The processor's vision tensors as forward() takes them (pixels in the compute dtype)."""
    out = {}
    for _, pixels, grid in _KINDS.values():
        if inputs.get(pixels) is not None:
            out[pixels], out[grid] = inputs[pixels].to(dtype), inputs[grid]
    return out


def _slice_features(features, start: int, end: int):
    """The vision encoder's output for media tokens start..end (in order), shaped as the model takes it."""
    sliced = copy.copy(features)
    sliced["pooler_output"] = (torch.cat(features.pooler_output, dim=0)[start:end],)
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack is not None:
        sliced["deepstack_features"] = [(torch.cat(level, dim=0)[start:end],) for level in deepstack]
    return sliced
