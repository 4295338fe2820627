"""The Engine: one loaded model that caches images and answers prompts from cached states."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import generate, images, model as model_loading, prompt
from .errors import ImageError, ModelMismatchError, VlcacheError
from .state import ImageState, StateMetadata, load_state

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant analyzing an image."
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class Answer:
    text: str
    token_ids: list[int]  # generated ids, an end-of-turn token included when the model produced one
    prompt_tokens: int  # all tokens before the answer: cached prefix + new suffix
    cached_tokens: int  # tokens taken from the state instead of being computed
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefill_s, ttft_s, decode_s, total_s

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


@dataclass
class Delta:
    """One streamed step: new text (may be empty while a character is incomplete) and its token id."""

    text: str
    token_id: int
    answer: Answer | None = None  # set on the last delta only


class Engine:
    def __init__(self, loaded: model_loading.LoadedModel):
        self._loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self._eos_ids = _eos_ids(self.model.generation_config)

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", dtype: str = "auto") -> "Engine":
        """Load a model by hub id or local folder (default: $VLCACHE_MODEL or Qwen/Qwen3-VL-2B-Instruct)."""
        return cls(model_loading.load(model or model_loading.default_model(), device=device, dtype=dtype))

    @property
    def model_name(self) -> str:
        return self._loaded.name

    @property
    def fingerprint(self) -> str:
        return self._loaded.fingerprint

    @property
    def device(self) -> torch.device:
        return self._loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self._loaded.dtype

    # -- caching ---------------------------------------------------------------------------------------------

    def cache_image(
        self,
        image: str | os.PathLike | bytes,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_pixels: int | None = None,
    ) -> ImageState:
        """Run the vision encoder and the prefill over system prompt + image once; return the state."""
        # 1. Open the image (any mode, first frame) and check it fits in memory at the chosen resolution.
        loaded = images.load_image(image)
        images_kwargs = self._images_kwargs(max_pixels)
        self._check_memory(loaded, images_kwargs)
        # 2. Tokenize the prefix the chat template gives: system turn, user turn up to the image.
        split = prompt.split_image_prompt(self.processor, system_prompt)
        inputs = self.processor(
            text=[split.prefix_text], images=[loaded.image], return_tensors="pt", images_kwargs=images_kwargs
        ).to(self.device)
        # 3. Vision encoder + prefill with the model's own M-RoPE positions; keep the KV.
        positions, rope_delta = generate.mrope_positions(
            self.model, inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
        )
        cache = generate.DynamicCache(config=self.model.config)
        generate.forward(
            self.model,
            inputs["input_ids"],
            positions,
            cache,
            pixel_values=inputs["pixel_values"].to(self.dtype),
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        n = int(inputs["input_ids"].shape[1])
        metadata = StateMetadata(
            model=self.model_name,
            fingerprint=self.fingerprint,
            dtype=str(self.dtype).removeprefix("torch."),
            system_prompt=system_prompt,
            image_path=str(Path(loaded.path).resolve()) if loaded.path else None,
            image_sha256=loaded.sha256,
            image_size=[loaded.width, loaded.height],
            max_pixels=max_pixels,
            prefix_tokens=n,
            image_tokens=int(inputs["mm_token_type_ids"].sum()),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions=_versions(),
        )
        return ImageState(
            kv=generate.kv_from_cache(cache),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"].long(),
            image_grid_thw=inputs["image_grid_thw"],
            rope_deltas=torch.tensor([[rope_delta]], device=self.device),
            metadata=metadata,
        )

    def load_state(self, path: str | os.PathLike) -> ImageState:
        """Read a cache file made for this engine's model (refused with 'model mismatch' otherwise)."""
        state = load_state(path, device=self.device)
        self.check_state(state, source=str(path))
        if state.kv[0][0].dtype != self.dtype:
            state = state.to(self.device, self.dtype)
        return state

    def check_state(self, state: ImageState, source: str = "the state") -> None:
        meta = state.metadata
        if meta.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"model mismatch: {source} was made with {meta.model} (weights {meta.fingerprint[:12]}), but this "
                f"engine runs {self.model_name} (weights {self.fingerprint[:12]}); re-create the cache or pass "
                f"--model {meta.model}"
            )
        expected = self.model.config.get_text_config().num_hidden_layers
        if len(state.kv) != expected:
            raise ModelMismatchError(f"model mismatch: {source} has {len(state.kv)} layers, the model {expected}")

    # -- asking ----------------------------------------------------------------------------------------------

    def ask(
        self,
        state: ImageState | None,
        prompt_text: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        system_prompt: str | None = None,
    ) -> Answer:
        """Answer a prompt about a cached image (state) or, with state None, a text-only prompt."""
        delta = None
        for delta in self.stream(state, prompt_text, max_new_tokens, temperature, top_p, seed, system_prompt):
            pass
        return delta.answer

    def stream(
        self,
        state: ImageState | None,
        prompt_text: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        system_prompt: str | None = None,
    ) -> Iterator[Delta]:
        """Like ask, yielding text as it is generated; the last Delta carries the Answer."""
        _check_generation_args(max_new_tokens, temperature, top_p)
        start = time.perf_counter()
        # 1. The new tokens and the cache they continue: the state's prefix, or nothing for text-only.
        if state is not None:
            self.check_state(state)
            split = prompt.split_image_prompt(self.processor, state.metadata.system_prompt)
            new_ids = prompt.encode_text(self.processor, split.suffix_text(prompt_text)).to(self.device)
            cache = generate.cache_from_kv(self.model.config, state.kv)
            history, rope_delta = state.input_ids, int(state.rope_deltas.view(-1)[0])
        else:
            new_ids = prompt.text_only_ids(self.processor, system_prompt, prompt_text).to(self.device)
            cache = generate.DynamicCache(config=self.model.config)
            history, rope_delta = new_ids[:, :0], 0
        cached = int(history.shape[1])
        # 2. Prefill the new tokens, then decode, streaming text as whole characters become available.
        params = generate.sampling_params(self.model.generation_config, temperature, top_p, seed)
        steps = generate.generate_step(
            self.model, cache, history, new_ids, rope_delta, generate.make_sampler(params, self.device),
            max_new_tokens, self._eos_ids,
        )
        token_ids: list[int] = []
        shown = ""
        first_token_at = None
        for token_id in steps:
            first_token_at = first_token_at or time.perf_counter()
            token_ids.append(token_id)
            if len(token_ids) == max_new_tokens or token_id in self._eos_ids:
                break  # the last token goes out with the answer below
            text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
            # Hold back a trailing partial character; emit only text that extends what was shown.
            piece = text[len(shown):] if not text.endswith("\ufffd") and text.startswith(shown) else ""
            shown += piece
            yield Delta(text=piece, token_id=token_id)
        # 3. The last delta carries the whole answer with its counts and timings.
        end = time.perf_counter()
        first_token_at = first_token_at or end
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        answer = Answer(
            text=text,
            token_ids=token_ids,
            prompt_tokens=cached + int(new_ids.shape[1]),
            cached_tokens=cached,
            finish_reason="stop" if token_ids and token_ids[-1] in self._eos_ids else "length",
            timings={
                "ttft_s": first_token_at - start,
                "decode_s": end - first_token_at,
                "total_s": end - start,
                "tokens_per_s": (len(token_ids) - 1) / (end - first_token_at) if len(token_ids) > 1 and end > first_token_at else 0.0,
            },
        )
        tail = text[len(shown):] if text.startswith(shown) else text  # (a decoder that rewrote the past: resend)
        yield Delta(text=tail, token_id=token_ids[-1], answer=answer)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _images_kwargs(self, max_pixels: int | None) -> dict:
        if max_pixels is None:
            return {}
        if max_pixels <= 0:
            raise ImageError(f"--max-pixels must be positive, got {max_pixels}")
        size = dict(self.processor.image_processor.size)
        return {"size": {"shortest_edge": min(size.get("shortest_edge", max_pixels), max_pixels), "longest_edge": max_pixels}}

    def _check_memory(self, loaded: images.LoadedImage, images_kwargs: dict) -> None:
        """Refuse an image whose KV cache and activations would not fit in the memory at hand."""
        tokens = self.image_tokens(loaded.width, loaded.height, images_kwargs)
        need = 3 * tokens * self.kv_bytes_per_token()
        free = _available_memory(self.device)
        if free is not None and need > free:
            raise ImageError(
                f"image too large for the memory at hand: {loaded.width}x{loaded.height} becomes {tokens:,} image "
                f"tokens, needing about {need / 2**30:.1f} GiB with {free / 2**30:.1f} GiB free; pass --max-pixels "
                "(e.g. 1048576) to downscale it"
            )

    def image_tokens(self, width: int, height: int, images_kwargs: dict | None = None) -> int:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        size = (images_kwargs or {}).get("size") or dict(ip.size)
        factor = ip.patch_size * ip.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return (h // factor) * (w // factor)

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(self.dtype).bits // 8


def _check_generation_args(max_new_tokens, temperature, top_p) -> None:
    if max_new_tokens < 1:
        raise VlcacheError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise VlcacheError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise VlcacheError(f"top_p must be in (0, 1], got {top_p}")


def _eos_ids(generation_config) -> frozenset[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: MemAvailable counts reclaimable page cache, unlike free pages
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"vlcache": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
