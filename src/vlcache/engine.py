"""The Engine: one loaded model that caches images and answers prompts from cached states."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import decode, generate, images, media, model as model_loading, model_folders, paths, prompt
from .families import GENERIC, LINEAR, family_class
from .families.base import run_steps
from .defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SYSTEM_PROMPT
from .errors import CacheFileError, ImageError, LayoutError, ModelLoadError, ModelMismatchError, VlcacheError
from .media import MediaOptions
from .answer import Answer, Delta  # noqa: F401 - part of the engine's interface
from .header import Layout, check_layout, read_metadata, shared_source
from .state import ImageState, StateMetadata, check_state_layout, load_state

log = logging.getLogger("vlcache")


@dataclass
class GenerationOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None  # None: the model's generation config; 0: greedy
    top_p: float | None = None
    seed: int | None = None
    # OpenAI's and vLLM's per-request extras (None: the model's generation config, or off); see decode.sampling
    top_k: int | None = None  # sampling rows only; 0: no top-k
    min_p: float | None = None  # sampling rows only
    repetition_penalty: float | None = None  # replaces the model's
    logit_bias: dict[int, float] | None = None  # token id -> bias in -100..100
    frequency_penalty: float | None = None  # -2..2, OpenAI's definition (generated tokens only)
    presence_penalty: float | None = None  # -2..2
    logprobs: int | None = None  # 0..20: each token's logprob and the top N (Answer.logprobs, Delta.logprobs)
    # A grammar: called once per row for a fresh decode.TokenConstraint (ask_many makes one per prompt)
    constraint: Callable[[], decode.TokenConstraint] | None = None
    # Structured output: the answer is JSON held to this schema ({"type": "object"}: any object; vlcache.structured).
    # json_strict: objects carry only the properties the schema names (OpenAI's strict mode).
    json_schema: dict | None = None
    json_strict: bool = True
    json_wrap: tuple[str, str] | None = None  # fixed text around the JSON (a forced tool call's <tool_call> tags)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise VlcacheError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise VlcacheError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise VlcacheError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise VlcacheError(f"seed must be a 64-bit integer, got {self.seed}")
        try:  # the extras' ranges, as the decode step checks them
            decode.SamplingParams(0.0, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                  logit_bias=tuple((self.logit_bias or {}).items()),
                                  frequency_penalty=self.frequency_penalty or 0.0,
                                  presence_penalty=self.presence_penalty or 0.0, logprobs=self.logprobs).check()
        except (ValueError, TypeError) as exc:
            raise VlcacheError(str(exc)) from None


class Engine:
    def __init__(self, loaded: model_loading.LoadedModel, generation_config: dict | None = None):
        self._loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        # The model's generation config with the caller's overrides; a setting no decode step honours is refused.
        decode.rules.apply_override(self.model.generation_config, generation_config)
        why = decode.rules.refusal(self.model.generation_config)
        if why:
            raise ModelLoadError(f"model {loaded.name!r}: {why}")
        try:  # values no rule takes fail here, not at the first question
            for temperature in (None, 1.0):  # the config's own rows, and a caller's sampling row
                params = decode.sampling_params(self.model.generation_config, temperature)
                params.check()
            vocab = self.model.get_output_embeddings().weight.shape[0]
            for name, sequences in (("bad_words_ids", params.bad_words_ids),
                                    ("sequence_bias", [ids for ids, _ in params.sequence_bias])):
                outside = [t for ids in sequences for t in ids if t >= vocab]
                if outside:  # generate() refuses these too (transformers' SequenceBiasLogitsProcessor)
                    raise ValueError(f"generation setting {name} names token {outside[0]}, the model has {vocab} tokens")
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"model {loaded.name!r}: {exc}; override it with --generation-config KEY=VALUE "
                                 "(Engine.load(generation_config={...}))") from None
        # An unlisted model type gets the generic adapter (model.load lets it through once `vlcache check` passed).
        self.family = (family_class(self.model.config.model_type) or GENERIC)(self.model, self.processor)
        # State files name a local folder by its name alone; this machine remembers where it is (model_folders).
        model_folders.remember(loaded.fingerprint, loaded.name)
        self.eos_ids = _eos_ids(self.model.generation_config)
        self._dtype_notes: set[str] = set()
        self._grammars = None  # vlcache.structured.JsonGrammars, made on first use (Engine.grammars)
        decode.install(self.model)
        # bfloat16 linear layers on a CPU: weights reordered for oneDNN once, not at every call (decode.linear).
        self.packing = decode.linear.pack(self.model)
        log.debug(f"linear layers: {self.packing}")
        self.runner = None  # a decode.step.StepRunner once compiled steps are enabled (compile_steps)
        self.max_context: int | None = None  # the longest conversation a server takes (--max-context); None: the model's
        self.compile_status = {"step": "eager", "reason": "compile off", "buckets": []}
        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            # Measured (docs/benchmarks-cuda.md): fused SDPA kernels in generate and vlcache's shared-prefix
            # attention round differently in 16-bit; in float32 the tokens are equal.
            log.warning(f"note: on CUDA in {str(self.dtype).removeprefix('torch.')}, cached greedy answers can differ from "
                        "an uncached generate() by attention-kernel rounding; --dtype float32 gives equal tokens")

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", dtype: str = "auto", compile: str = "off",
             unchecked: bool = False, generation_config: dict | None = None, quantize: str = "none") -> "Engine":
        """Load a model by hub id or local folder (default: $VLCACHE_MODEL or Qwen/Qwen3-VL-2B-Instruct).

        `compile`: "off" (eager decode steps), "on" (compiled fixed-shape steps), "auto" (compiled where the
        exactness probe holds and they measure faster; see compile_steps). `unchecked`: an unlisted model type
        loads before `vlcache check` passed for it (the check itself). `generation_config`: settings that replace
        the model's generation_config.json's ({"no_repeat_ngram_size": 0, "num_beams": 1, ...}); a setting
        vlcache cannot honour (beam search, assistant models, watermarking, guidance) is refused here.
        `quantize`: "int8" holds the language model's linear layers in int8 (vlcache.quantize; needs the `quant`
        extra); its states are its own (made and used only by a model quantized the same way)."""
        engine = cls(model_loading.load(model or model_loading.default_model(), device=device, dtype=dtype,
                                        unchecked=unchecked, quantize=quantize), generation_config)
        if compile != "off":
            engine.compile_steps(compile)
        return engine

    def compile_steps(self, mode: str = "auto", buckets: Sequence[int] = (1,), backend: str | None = None,
                      max_context: int | None = None) -> dict:
        """Decode through compiled fixed-shape steps (decode.step), warmed up for `buckets` rows; return what
        was chosen and why (also in self.compile_status, which /health reports). `max_context`: the positions a
        compiled step attends over (rounded up to whole K/V blocks; default the model's context, at most
        decode.step.DEFAULT_SPAN), so that its shapes depend only on the batch size; a longer row steps eagerly.

        "on": compiled (inductor) steps. "auto": the step is compiled and kept only where, for this model, its
        greedy tokens equal transformers' generate() (fused kernels round differently) and, on a CPU, it is
        faster than the eager step; otherwise on CUDA the eager step's own kernels are captured as CUDA graphs
        (same numbers) and on a CPU the eager step stays. One log line says what was chosen and why.
        """
        from .decode import probe

        from .decode.step import span_for

        span = span_for(max_context) if max_context else None
        self.compile_status = probe.choose(self, mode, list(buckets), backend, span)
        log.info(f"decode steps: {self.compile_status['step']} ({self.compile_status['reason']})")
        return self.compile_status

    @property
    def model_name(self) -> str:
        return self._loaded.name

    @property
    def quantization(self) -> str:
        """"none", or "int8" (vlcache.quantize)."""
        return self._loaded.quantization

    @property
    def fingerprint(self) -> str:
        return self._loaded.fingerprint

    @property
    def device(self) -> torch.device:
        return self._loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self._loaded.dtype

    @property
    def dtype_reason(self) -> str:
        """Why the engine computes in its dtype: "requested", or what --dtype auto saw."""
        return self._loaded.dtype_reason

    # -- caching ---------------------------------------------------------------------------------------------

    def cache(
        self,
        parts: Sequence[str | os.PathLike | bytes],
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        options: MediaOptions | None = None,
    ) -> ImageState:
        """Run the vision encoder and the prefill once over system prompt + images and videos, in order, in one
        user turn; return the state. A path with a video suffix (.mp4, .webm, .mov, ...) is a video."""
        if not parts:
            raise ImageError("nothing to cache: give at least one image or video")
        kinds = [media.kind_of(p) for p in parts]
        return run_steps(self.cache_media_steps(parts, prompt.media_conversation(system_prompt, kinds), options))

    def cache_image(
        self,
        image: str | os.PathLike | bytes,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_pixels: int | None = None,
    ) -> ImageState:
        """Run the vision encoder and the prefill over system prompt + image once; return the state."""
        return self.cache_prefix(image, prompt.image_conversation(system_prompt), max_pixels)

    def cache_prefix(self, image, messages: list[dict], max_pixels: int | None = None) -> ImageState:
        """Like cache_image for any conversation that ends in an open user turn whose last part is the image."""
        return run_steps(self.cache_media_steps([image], messages, MediaOptions(max_pixels=max_pixels)))

    def cache_media_steps(self, sources: Sequence, messages: list[dict], options: MediaOptions | None = None,
                          chunk: int | None = None, max_decode_pixels: int = images.MAX_DECODE_PIXELS,
                          base: ImageState | None = None, at: str | None = None):
        """The state of `messages` (ending in an open user turn whose last part is media), whose image and
        video parts are `sources` in order, as a generator: yields between units of work (the vision encoder,
        pieces of at most `chunk` prefix tokens where the family can split its prefill) and returns the
        ImageState. Images and video frames that declare more than `max_decode_pixels` are refused before
        they are decoded. `base`, a state of a leading part of the same conversation that ends after a media
        part, is continued instead of starting over where the family can (only the media after it are encoded).
        """
        prepared = self.prepare_media(sources, messages, options, max_decode_pixels, at)  # `at`: see prepare_media
        return (yield from self.prefill_media_steps(prepared, chunk, base))

    def prepare_media(self, sources: Sequence, messages: list[dict], options: MediaOptions | None = None,
                      max_decode_pixels: int = images.MAX_DECODE_PIXELS, at: str | None = None) -> "PreparedMedia":
        """The model-free half of cache_media_steps: open the media, check they fit, run the processor. A
        server runs this beside the model thread (decoding a long video must not pause running answers).
        `at`: the instant a clock-reading template renders at (pin_time() when the state's key was made: the
        state must be what its key names, even when the minute turns in between); None: now."""
        options = options or MediaOptions()
        # 1. Open the media (videos: probe and choose frames) and check that all of it fits in memory.
        prompt.check_messages(self.processor, messages)
        kinds = prompt.media_kinds(messages)
        if len(kinds) != len(sources):
            raise ImageError(f"the conversation has {len(kinds)} media parts but {len(sources)} sources were given")
        at = at or self.pin_time()  # a template that stamps the time: the instant this state's text is rendered at
        text = prompt.covered_text(self.processor, messages, at)
        prompt.check_video_placeholders(self.processor, text, kinds)
        images_kwargs = self.images_kwargs(options.max_pixels)
        parts = media.load_parts(sources, kinds, self.family, options, images_kwargs, max_decode_pixels, self._check_memory)
        # 2. Tokenize what the chat template puts before the question, every image and video expanded.
        try:
            inputs = self.family.prefix_inputs(
                text, [p.image for p in parts if p.kind == media.IMAGE],
                [p.video for p in parts if p.kind == media.VIDEO], images_kwargs,
            ).to(self.device)
        except ValueError as exc:  # e.g. a video of one frame where the encoder pairs frames
            raise ImageError(f"the model's processor refused the media: {str(exc).splitlines()[0]}") from None
        return PreparedMedia(messages=messages, parts=parts, inputs=inputs, options=options, at=at,
                             rendered=_sha256(text) if at else None)

    def prefill_media_steps(self, prepared: "PreparedMedia", chunk: int | None = None, base: ImageState | None = None):
        """The model half of cache_media_steps: vision encoder + prefill with the family's own positions
        (after `base` where it leads the prepared prefix), as a generator; returns the ImageState."""
        inputs = prepared.inputs
        start = _leading(base, inputs["input_ids"]) if base is not None and self.family.extends else 0
        if start:
            cache = generate.cache_from_kv(self.model.config, self.adopt(base).kv)
        else:
            cache = generate.DynamicCache(config=self.model.config)
        rope_delta = yield from self.family.prefill_steps(inputs, cache, self.dtype, chunk, start)
        return ImageState(
            kv=generate.kv_from_cache(cache),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=self.family.image_token_mask(inputs),
            image_grid_thw=_grids(inputs, self.device),
            rope_deltas=torch.tensor([[rope_delta]], device=self.device),
            metadata=self._metadata(prepared, inputs, reused=start),
        )

    def _metadata(self, prepared: "PreparedMedia", inputs, reused: int) -> StateMetadata:
        messages, parts, options = prepared.messages, prepared.parts, prepared.options
        first = parts[0]
        grids = _part_grids(parts, inputs)
        settings = self.media_settings(options, [p.kind for p in parts])
        return StateMetadata(
            model=paths.served_name(self.model_name),  # a hub id, or a folder's own name: never a local path
            fingerprint=self.fingerprint,
            dtype=str(self.dtype).removeprefix("torch."),
            system_prompt=next((m["content"] for m in messages if m["role"] == "system"), None),
            image_path=str(Path(first.path).resolve()) if first.path else None,
            image_sha256=first.sha256,
            image_size=[first.width, first.height],
            max_pixels=options.max_pixels,
            prefix_tokens=int(inputs["input_ids"].shape[1]),
            image_tokens=int(self.family.image_token_mask(inputs).sum()),
            created=_now(),
            messages=messages,
            processor_settings=settings,
            versions=_versions(),
            family=self.family.name,
            layer_kinds=self.family.layer_kinds(),
            parts=[p.record(g) for p, g in zip(parts, grids)],
            reused_tokens=reused,
            template_time=prepared.at,
            template_sha256=prepared.rendered,
            quantization=self.quantization,
        )

    def cache_images(self, images: Sequence[str], output_dir: str | os.PathLike,
                     system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_pixels: int | None = None,
                     force: bool = False, on_result=None, on_start=None, fps: float | None = None,
                     max_frames: int | None = None) -> list:
        """Cache many images and videos (files, folders, globs) into output_dir, one state each, with this
        one model load.

        Outputs are named `<stem>_cache.pt` (see vlcache.batch.output_names); a cache that is up to date is
        skipped unless force; a bad image is reported in its CacheResult and the rest go on.
        """
        from .batch import cache_images

        options = MediaOptions(max_pixels=max_pixels, fps=fps, max_frames=max_frames)
        return cache_images(self, images, output_dir, system_prompt, options, force, on_result, on_start)

    def load_state(self, path: str | os.PathLike) -> ImageState:
        """Read a cache file made for this engine's model (refused with 'model mismatch' otherwise)."""
        try:  # the header against this model's layout first, as the server's store does: nothing else is read
            state = load_state(path, device=self.device, layout=self.layout())
        except LayoutError as exc:
            self._check_fingerprint(read_metadata(path), str(path))  # another model's file says so first
            raise ModelMismatchError(f"model mismatch: {exc}") from None
        self.check_state(state, source=str(path))
        return self.adopt(state)

    def adopt(self, state: ImageState) -> ImageState:
        """The state in this engine's dtype: cast if it was computed in another, with a note (once per dtype)."""
        stored = next(k.dtype for k, _ in state.kv if k is not None)
        if stored == self.dtype and all(k is None or k.dtype == self.dtype for k, _ in state.kv):  # every layer's
            return state
        name, mine = str(stored).removeprefix("torch."), str(self.dtype).removeprefix("torch.")
        if name not in self._dtype_notes:
            self._dtype_notes.add(name)
            log.warning(
                f"note: a state computed in {name} is used in {mine}; answers equal the uncached ones only within "
                f"one dtype (pass --dtype {name}, or re-create the cache in {mine})"
            )
        return state.to(self.device, self.dtype)

    def check_state(self, state: ImageState, source: str = "the state") -> None:
        self._check_fingerprint(state.metadata, source)
        expected = self.model.config.get_text_config().num_hidden_layers
        if len(state.kv) != expected:
            raise ModelMismatchError(f"model mismatch: {source} has {len(state.kv)} layers, the model {expected}")
        try:
            check_state_layout(state, self.layout(), source)
        except LayoutError as exc:  # a file with this model's fingerprint but forged tensors
            raise ModelMismatchError(f"model mismatch: {exc}") from None

    def check_header(self, header: dict, meta: StateMetadata, source: str) -> None:
        """check_state from a file's header alone, before any tensor is read (an upload still arriving)."""
        self._check_fingerprint(meta, source)
        try:
            check_layout(header, meta, self.layout(), source)
        except CacheFileError as exc:
            raise ModelMismatchError(f"model mismatch: {exc}") from None

    def _check_fingerprint(self, meta: StateMetadata, source: str) -> None:
        if meta.quantization != self.quantization:  # the same weights quantized otherwise compute other K/V
            made, runs = (_quantization_words(q) for q in (meta.quantization, self.quantization))
            flag = f"--quantize {meta.quantization}"
            raise ModelMismatchError(
                f"quantization mismatch: {source} was made by {made} model, but this engine runs {runs} model; "
                f"re-create the cache with this model or load the model with {flag}")
        if meta.fingerprint != self.fingerprint:
            # A file names a local folder by its name alone: where this machine has that folder, say where.
            model = model_folders.folder_for(meta.fingerprint, meta.model) or meta.model
            raise ModelMismatchError(
                f"model mismatch: {source} was made with {model} (weights {meta.fingerprint[:12]}), but this "
                f"engine runs {self.model_name} (weights {self.fingerprint[:12]}); re-create the cache or pass "
                f"--model {model}"
            )

    def layout(self) -> Layout:
        """What this model's state files hold, layer by layer (see header.check_layout)."""
        kinds = tuple(self.family.layer_kinds())
        conv, recurrent = self.family.linear_state_shapes() if LINEAR in kinds else (None, None)
        return Layout(kinds, tuple(self.family.kv_shapes()), conv, recurrent, self.family.attention_chunk(),
                      self.family.sliding_window())

    # -- asking ----------------------------------------------------------------------------------------------

    def ask(self, state: ImageState | None, prompt_text: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
            system_prompt: str | None = None, **extras) -> Answer:
        """Answer a prompt about a cached image (state) or, with state None, a text-only prompt. `extras`: the
        per-request options of GenerationOptions (top_k, min_p, repetition_penalty, logit_bias,
        frequency_penalty, presence_penalty, logprobs, constraint)."""
        delta = None
        for delta in self.stream(state, prompt_text, max_new_tokens, temperature, top_p, seed, system_prompt, **extras):
            pass
        return delta.answer

    def stream(self, state: ImageState | None, prompt_text: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
               system_prompt: str | None = None, **extras) -> Iterator[Delta]:
        """Like ask, yielding text as it is generated; the last Delta carries the Answer."""
        options = _options(max_new_tokens, temperature, top_p, seed, extras)
        if state is None:
            prompt.check_text(self.processor, prompt_text, "the question")
            prompt.check_text(self.processor, system_prompt or "", "the system prompt")
            new_ids = prompt.text_only_ids(self.processor, system_prompt, prompt_text).to(self.device)
            return self.stream_ids(decode.Prefix(self.empty_kv(), 0), new_ids[:, :0], new_ids, options)
        self.check_state(state)
        state = self.adopt(state)
        new_ids = self.question_ids(state.metadata.messages, prompt_text, state.metadata.template_time)
        return self.stream_ids(self.state_prefix(state), state.input_ids, new_ids, options)

    def ask_many(self, state: ImageState, prompts: Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 **extras) -> list[Answer]:
        """Answer several prompts about one state in one batched generation (rows reading one copy of the state).

        With greedy decoding each answer equals asking its prompt alone. With sampling and a seed, row i
        samples with seed + i, so a batch is repeatable. `extras`: as for ask (a constraint factory makes one
        constraint per prompt).
        """
        options = _options(max_new_tokens, temperature, top_p, seed, extras)
        options.check()
        if not prompts:
            return []
        self.check_state(state)
        state = self.adopt(state)
        prefix = self.state_prefix(state)
        new_ids = [self.question_ids(state.metadata.messages, p, state.metadata.template_time) for p in prompts]
        start = time.perf_counter()
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        first = None
        # Rows that cannot be padded (linear-attention layers) are batched by question length.
        for rows in generate.batch_groups([n.shape[1] for n in new_ids], can_pad=not self.family.has_linear_layers):
            batch = self.batch()
            for r in rows:
                batch.add(prefix, self.sampling(options, r), options.max_new_tokens, torch.cat([state.input_ids[0], new_ids[r][0]]),
                          self.constraint(options))
            for step in decode.generate(batch, [new_ids[r][0] for r in rows]):
                first = first or time.perf_counter()
                for i, (r, token) in enumerate(zip(rows, step)):
                    if token is not None:
                        tokens[r].append(token)
                        logprobs[r].append(batch.logprobs[i])
                        stopped[r] = batch.ended[i] and len(tokens[r]) < options.max_new_tokens
        timing = _Timing(start, first)
        wanted = options.logprobs is not None
        return [self.answer(ids, state.num_tokens, state.num_tokens + n.shape[1], timing, lps if wanted else None, stop)
                for ids, n, lps, stop in zip(tokens, new_ids, logprobs, stopped)]

    # -- the layers under ask, stream and ask_many -------------------------------------------------------------

    def question_ids(self, messages: list[dict], question: str, at: str | None = None) -> torch.Tensor:
        """The ids a question adds after a state of `messages` whose template text was rendered at `at`."""
        prompt.check_text(self.processor, question, "the question")
        return self.ids_after(messages, prompt.with_question(messages, question), at=at)

    def ids_after(self, covered: list[dict], messages: list[dict], add_generation_prompt: bool = True,
                  at: str | None = None) -> torch.Tensor:
        """Token ids of `messages` after what a state of the `covered` messages holds, rendered at the state's
        instant `at`, tokenized as the processor tokenizes the whole conversation (the family's encode_after)."""
        before, rest = prompt.split_after(self.processor, covered, messages, add_generation_prompt, at)
        return self.family.encode_after(before, rest).to(self.device)

    def pin_time(self) -> str | None:
        """Now, where the chat template stamps the date or time (a state's text and its questions are all rendered
        at the instant it was made); None for a template without a clock."""
        return prompt.now() if prompt.stamps_time(self.processor.chat_template) else None

    def state_prefix(self, state: ImageState) -> decode.Prefix:
        return decode.Prefix(kv=state.kv, tokens=state.num_tokens, rope_delta=_delta(state))

    def batch(self, pool: decode.KVPool | None = None, fresh_rows: bool = True) -> decode.Batch:
        """An empty batch of rows on this engine's model: what every question decodes in. `pool`: K/V blocks
        shared with other batches (a state written once for all their rows), else its own. `fresh_rows`: rows'
        own tokens begin on a fresh block (decode.rows); the server's, whose blocks become kept chains, do not."""
        return decode.Batch(self.model, self.family.positions, self.eos_ids, self.device, self.dtype, runner=self.runner,
                            tokenizer=getattr(self.processor, "tokenizer", self.processor), pool=pool,
                            fresh_rows=fresh_rows)

    def stream_ids(self, prefix: decode.Prefix, history: torch.Tensor, new_ids: torch.Tensor,
                   options: GenerationOptions, batch: decode.Batch | None = None) -> Iterator[Delta]:
        """Generate after `history` (whose state is `prefix`) and `new_ids`; stream Deltas, the last with the Answer.

        `batch` may be a live batch whose row 0 holds exactly `history` (conversations continue in place);
        otherwise a row is made from `prefix`, which is never written.
        """
        options.check()
        start = time.perf_counter()
        text = TextAssembler(self.processor.tokenizer)
        first = None
        seen = torch.cat([history[0], new_ids[0]])
        constraint = self.constraint(options)
        if batch is None:
            batch = self.batch()
            batch.add(prefix, self.sampling(options), options.max_new_tokens, seen, constraint)
        else:
            batch.restart(0, self.sampling(options), options.max_new_tokens, seen, constraint)
        logprobs: list = []
        last = None
        for (token_id,) in decode.generate(batch, [new_ids[0]]):
            if token_id is None:  # a broken distribution (NaN logits): nothing more can come
                break
            first = first or time.perf_counter()
            logprobs.append(last := batch.logprobs[0])
            # The last token (the length limit, end of sequence, a stop string, a complete grammar) goes out
            # with the answer below.
            if len(text.token_ids) + 1 == options.max_new_tokens or token_id in self.eos_ids or batch.ended[0]:
                text.token_ids.append(token_id)
                break
            yield Delta(text=text.add(token_id), token_id=token_id, logprobs=last)
        if not text.token_ids:
            raise VlcacheError("generation failed: the model gave no valid distribution (NaN logits)")
        stopped = bool(batch.ended and batch.ended[0]) and len(text.token_ids) < options.max_new_tokens
        answer = self.answer(text.token_ids, history.shape[1], history.shape[1] + new_ids.shape[1], _Timing(start, first),
                             logprobs if options.logprobs is not None else None, stopped)
        yield Delta(text=text.rest(answer.text), token_id=text.token_ids[-1], answer=answer, logprobs=last)

    def sampling(self, options: GenerationOptions, seed_offset: int = 0) -> decode.SamplingParams:
        """How a row samples: the model's generation config overridden by `options`; a seed moved by `seed_offset`."""
        params = decode.sampling_params(
            self.model.generation_config, options.temperature, options.top_p, options.seed, top_k=options.top_k,
            min_p=options.min_p, repetition_penalty=options.repetition_penalty, logit_bias=options.logit_bias,
            frequency_penalty=options.frequency_penalty, presence_penalty=options.presence_penalty,
            logprobs=options.logprobs)
        try:
            params.check()
        except ValueError as exc:
            raise VlcacheError(str(exc)) from None
        vocab = self.model.get_output_embeddings().weight.shape[0]
        outside = [t for t, _ in params.logit_bias if t >= vocab]
        if outside:
            raise VlcacheError(f"logit_bias names token {outside[0]}, the model's vocabulary has {vocab} tokens")
        if params.seed is not None:
            params = _with_seed(params, params.seed + seed_offset)
        return params

    @property
    def grammars(self):
        """This model's JSON grammars (vlcache.structured), made on first use: reading the tokenizer costs time."""
        if self._grammars is None:
            from .structured import JsonGrammars

            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._grammars = JsonGrammars(self.processor.tokenizer, vocab, self.eos_ids)
        return self._grammars

    def constraint(self, options: GenerationOptions):
        """A fresh grammar state for one row of `options` (the caller's own, or a JSON schema's), or None."""
        if options.constraint is not None:
            return options.constraint()
        if options.json_schema is not None:
            return self.grammars.constraint(options.json_schema, options.json_strict, options.json_wrap)
        return None

    def check_options(self, options: GenerationOptions) -> None:
        """Refuse options this model cannot take, before any row starts: the ranges, a token id past the
        vocabulary, a schema that does not compile (compiled here once, then cached)."""
        options.check()
        if options.json_schema is not None:
            self.grammars.compile(options.json_schema, options.json_strict, options.json_wrap)

    def answer(self, token_ids: list[int], cached: int, prompt_tokens: int, timing: "_Timing",
               logprobs: list | None = None, stopped: bool = False) -> Answer:
        """`stopped`: the row ended by a rule (a stop string, a complete grammar): finish_reason "stop"."""
        end = time.perf_counter()
        first = timing.first or end
        decode = end - first
        return Answer(
            text=self.processor.tokenizer.decode(token_ids, skip_special_tokens=True),
            token_ids=token_ids,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            finish_reason="stop" if stopped or (token_ids and token_ids[-1] in self.eos_ids) else "length",
            timings={
                "ttft_s": first - timing.start,
                "decode_s": decode,
                "total_s": end - timing.start,
                "tokens_per_s": (len(token_ids) - 1) / decode if len(token_ids) > 1 and decode > 0 else 0.0,
            },
            logprobs=logprobs,
        )

    def empty_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The state of no tokens: empty K/V, and no state (a fresh start) for linear-attention layers (nor
        anything for a shared layer, which keeps none)."""
        out = []
        for kind, (heads, dim) in zip(self.family.layer_kinds(), self.family.kv_shapes()):
            if kind == LINEAR or shared_source(kind) is not None:
                out.append((None, None))
            else:
                empty = torch.empty(1, heads, 0, dim, dtype=self.dtype, device=self.device)
                out.append((empty, empty))
        return out

    # -- image sizes and memory ------------------------------------------------------------------------------

    def images_kwargs(self, max_pixels: int | None) -> dict:
        try:
            return self.family.images_kwargs(max_pixels)
        except ValueError as exc:
            raise ImageError(str(exc)) from None

    def processor_settings(self, max_pixels: int | None) -> dict:
        """What decides an image's tokens besides its pixels: part of a cache's identity."""
        return self.family.processor_settings(max_pixels)

    def state_key(self, parts: Sequence[tuple[str, str]], messages: list[dict], options: MediaOptions,
                  salt: str | None = None, at: str | None = None) -> str:
        """The key of the state of `messages` whose media are `parts` ((kind, sha256) in order): what the server,
        its store and the Ray batch name a state by. `at`: the instant pinned for the state (None: now)."""
        from .header import media_identity, state_key

        # A template that stamps the time renders these messages into another prefix on another day (or minute):
        # states are then found by the text rendered now.
        at = at or self.pin_time()
        rendered = _sha256(prompt.covered_text(self.processor, messages, at)) if at else None
        return state_key(self.fingerprint, media_identity(list(parts)), messages,
                         self.media_settings(options, [kind for kind, _ in parts]), salt, rendered)

    def media_settings(self, options: MediaOptions, kinds: Sequence[str]) -> dict:
        """processor_settings, and with videos among `kinds` what decides their frames and tokens."""
        settings = self.processor_settings(options.max_pixels)
        if media.VIDEO in kinds:
            settings["video"] = self.family.video_settings(options.fps, options.max_frames)
        # As a file stores them (JSON: tuples become lists), so that stored and current settings compare equal.
        return json.loads(json.dumps(settings))

    def _check_memory(self, parts: list[media.Part]) -> None:
        """Refuse media whose KV cache and activations would not fit in the memory at hand (before any video
        frame is decoded)."""
        tokens = sum(p.tokens or 0 for p in parts)
        if not tokens:
            return
        need = 3 * tokens * self.kv_bytes_per_token()
        free = model_loading.available_memory(self.device)
        if free is not None and need > free:
            what = ", ".join(f"{p.kind} {p.width}x{p.height}" for p in parts)
            raise ImageError(
                f"media too large for the memory at hand: {what} become {tokens:,} tokens, needing about "
                f"{need / 2**30:.1f} GiB with {free / 2**30:.1f} GiB free; pass --max-pixels (e.g. 1048576)"
                + (" or --max-frames" if any(p.kind == media.VIDEO for p in parts) else "")
            )

    def image_tokens(self, width: int, height: int, images_kwargs: dict | None = None) -> int | None:
        return self.family.image_tokens(width, height, images_kwargs or {})

    def kv_bytes_per_token(self) -> int:
        """K/V bytes a token costs while it is computed: every layer that keeps K/V of its own (shared layers read
        another's; linear layers are counted as attention, an upper bound)."""
        shapes = [shape for shape, kind in zip(self.family.kv_shapes(), self.family.layer_kinds()) if shared_source(kind) is None]
        return 2 * sum(heads * dim for heads, dim in shapes) * torch.finfo(self.dtype).bits // 8


class TextAssembler:
    """Turns generated ids into text pieces: whole characters only, each piece extending what was shown."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.shown = ""

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        # Hold back a trailing partial character; emit only text that extends what was shown.
        piece = text[len(self.shown):] if not text.endswith("\ufffd") and text.startswith(self.shown) else ""
        self.shown += piece
        return piece

    def rest(self, final_text: str) -> str:
        """What of the final text was not shown yet."""
        return final_text[len(self.shown):] if final_text.startswith(self.shown) else final_text


@dataclass
class PreparedMedia:
    """Opened media and processor outputs for a state, ready for the model (Engine.prepare_media)."""

    messages: list[dict]
    parts: list[media.Part]
    inputs: dict
    options: MediaOptions
    at: str | None = None  # the instant a clock-reading chat template was rendered at
    rendered: str | None = None  # then the sha256 of the text rendered


@dataclass
class _Timing:
    start: float
    first: float | None


def _leading(base: ImageState, ids: torch.Tensor) -> int:
    """How many tokens of `ids` the base state holds: all of its own if they lead `ids` (0 otherwise)."""
    n = base.num_tokens
    if n >= ids.shape[1] or not torch.equal(base.input_ids[0].to(ids.device), ids[0, :n]):
        return 0
    return n


def _grids(inputs, device) -> torch.Tensor:
    """[k, 3]: the (t, h, w) grid of every image, then every video, where the family has grids (else zeros)."""
    grids = [inputs[name] for name in ("image_grid_thw", "video_grid_thw") if inputs.get(name) is not None]
    return torch.cat(grids).long() if grids else torch.zeros(1, 3, dtype=torch.long, device=device)


def _part_grids(parts: list[media.Part], inputs) -> list:
    """Each part's grid, in the parts' order (None where the family has none)."""
    queues = {media.IMAGE: inputs.get("image_grid_thw"), media.VIDEO: inputs.get("video_grid_thw")}
    seen = {media.IMAGE: 0, media.VIDEO: 0}
    out = []
    for p in parts:
        grids = queues[p.kind]
        out.append(grids[seen[p.kind]].tolist() if grids is not None and seen[p.kind] < len(grids) else None)
        seen[p.kind] += 1
    return out


def _delta(state: ImageState) -> int:
    return int(state.rope_deltas.view(-1)[0])


def _options(max_new_tokens, temperature, top_p, seed, extras: dict) -> GenerationOptions:
    """GenerationOptions from ask's arguments; an extra GenerationOptions does not know is refused."""
    known = set(GenerationOptions.__dataclass_fields__) - {"max_new_tokens", "temperature", "top_p", "seed"}
    unknown = sorted(set(extras) - known)
    if unknown:
        raise VlcacheError(f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return GenerationOptions(max_new_tokens, temperature, top_p, seed, **extras)


def _with_seed(params: decode.SamplingParams, seed: int) -> decode.SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


def _quantization_words(quantization: str) -> str:
    return "a float (not quantized)" if quantization == "none" else f"an {quantization}-quantized"


def _eos_ids(generation_config) -> frozenset[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"vlcache": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
