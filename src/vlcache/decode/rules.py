"""A model's generation config as vlcache decodes it: which of its settings become per-row rules, which are
refused, and the caller's overrides.

transformers' generate() fills what a checkpoint's generation_config.json leaves unset with its global defaults
(GenerationConfig._get_default_generation_params) and builds its logits processors from the result; so do we,
with the same defaults, so that a row decodes as generate() would. A setting vlcache cannot honour (beam search,
assistant models, watermarking, guidance, ...) is refused when the model loads, in one line that names it and
the override that turns it off (Engine.load(generation_config=...), `--generation-config KEY=VALUE`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError

# Settings that need a decoding loop vlcache does not have: name -> (the value that means "off", why).
_REFUSED = {
    "num_beams": (1, "beam search"),
    "num_beam_groups": (1, "group beam search"),
    "diversity_penalty": (0.0, "group beam search"),
    "num_return_sequences": (1, "several sequences per prompt"),
    "penalty_alpha": (None, "contrastive search"),
    "dola_layers": (None, "DoLa decoding"),
    "guidance_scale": (None, "classifier-free guidance"),
    "watermarking_config": (None, "watermarking"),
    "constraints": (None, "constrained beam search"),
    "force_words_ids": (None, "constrained beam search"),
    "prompt_lookup_num_tokens": (None, "prompt-lookup decoding"),
    "top_h": (None, "top-H sampling"),
    "token_healing": (None, "token healing"),
    "encoder_repetition_penalty": (1.0, "the encoder repetition penalty"),
    "encoder_no_repeat_ngram_size": (0, "the encoder n-gram rule"),
    "max_time": (None, "a time limit (answers would depend on the machine's speed)"),
    "use_mtp": (None, "multi-token prediction"),
    "assistant_early_exit": (None, "self-speculative decoding"),
    "speculation_type": (None, "speculative decoding"),
}
_OFF_TOO = {"guidance_scale": (1, 1.0), "token_healing": (False,), "use_mtp": (False,)}  # also "off"

# Settings every row applies (decode.sampling; tests/test_logits_rules.py compares each with generate()).
APPLIED = frozenset({
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_length", "min_new_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "remove_invalid_values", "stop_strings", "eos_token_id",
})
# Settings that cannot change an answer's tokens here: name -> why.
NO_EFFECT = {
    **dict.fromkeys(("max_length", "max_new_tokens"), "every request gives max_new_tokens, as a test gives generate()"),
    "renormalize_logits": "a log-softmax after the filters: the same argmax and the same distribution",
    **dict.fromkeys(("pad_token_id", "bos_token_id", "decoder_start_token_id"), "no padding, no decoder start"),
    **dict.fromkeys(("use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
                     "disable_compile", "prefill_chunk_size", "continuous_batching_config", "low_memory"),
                    "how generate() runs the model, not what it chooses"),
    **dict.fromkeys(("output_attentions", "output_hidden_states", "output_logits", "output_scores",
                     "return_dict_in_generate"), "what generate() returns besides the tokens"),
    **dict.fromkeys(("early_stopping", "length_penalty"), "beam search only (num_beams is 1)"),
    **dict.fromkeys(("is_assistant", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
                     "assistant_ensemble_weight", "num_assistant_tokens", "num_assistant_tokens_schedule",
                     "max_matching_ngram_size"), "speculative decoding only (refused above)"),
    **dict.fromkeys(("transformers_version", "_from_model_config"), "bookkeeping"),
}


def defaults() -> dict:
    from transformers import GenerationConfig

    return GenerationConfig._get_default_generation_params()


def setting(generation_config, name: str):
    """A setting as generate() sees it: the config's, else transformers' global default."""
    value = getattr(generation_config, name, None)
    return defaults().get(name) if value is None else value


def refusal(generation_config) -> str | None:
    """One line naming the first setting vlcache cannot honour and how to override it, or None."""
    for name, (off, why) in _REFUSED.items():
        value = setting(generation_config, name)
        if value is None or value == off or value in _OFF_TOO.get(name, ()):
            continue
        shown = json.dumps(value) if isinstance(value, (int, float, str, bool, list)) else type(value).__name__
        fix = "null" if off is None else json.dumps(off)
        return (f"the model's generation config sets {name}={shown} ({why}), which vlcache cannot honour: override "
                f"it with --generation-config {name}={fix} (Engine.load(generation_config={{{name!r}: {fix}}}))")
    if getattr(generation_config, "assistant_model", None) is not None:
        return "the model's generation config names an assistant model, which vlcache cannot honour"
    # A setting of this transformers that no list above names (a newer release's) is refused when it is set,
    # never silently dropped.
    default = type(generation_config)()
    for name in sorted(vars(default)):
        if name in APPLIED or name in NO_EFFECT or name in _REFUSED:
            continue
        value = getattr(generation_config, name, None)
        if value is not None and value != getattr(default, name):
            return (f"the model's generation config sets {name}, which vlcache does not know how to apply: override it "
                    f"with --generation-config {name}=null (Engine.load(generation_config={{{name!r}: None}}))")
    return None


def parse_override(items) -> dict:
    """--generation-config values -> a dict: each item a JSON file (an object) or KEY=VALUE (VALUE as JSON,
    else a string). Later items win."""
    out: dict = {}
    for item in items or ():
        if "=" in item and not Path(item).is_file():
            key, _, text = item.partition("=")
            key = key.strip()
            if not key.isidentifier():
                raise ValueError(f"--generation-config {item!r}: expected KEY=VALUE or a JSON file")
            try:
                out[key] = json.loads(text)
            except ValueError:
                out[key] = text
            continue
        try:
            data = json.loads(Path(item).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--generation-config {item!r}: not a readable JSON file ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--generation-config {item!r}: the file holds no JSON object")
        out.update(data)
    return out


def apply_override(generation_config, override: dict | None) -> None:
    """Set the caller's values on the model's generation config (in place); unknown names are refused."""
    if not override:
        return
    known = set(generation_config.to_dict()) | set(defaults()) | set(vars(generation_config))
    for key, value in override.items():
        if key not in known:
            raise ModelLoadError(f"--generation-config: {key!r} is not a generation setting transformers knows")
        setattr(generation_config, key, value)


def config_rules(generation_config) -> dict:
    """The per-row rules a generation config asks for, as SamplingParams fields (see decode.sampling)."""
    get = lambda name: setting(generation_config, name)  # noqa: E731
    min_new = int(get("min_new_tokens") or 0)
    decay = get("exponential_decay_length_penalty")
    forced_eos = get("forced_eos_token_id")
    stops = get("stop_strings")
    return {
        "no_repeat_ngram_size": int(get("no_repeat_ngram_size") or 0),
        # generate() replaces min_length by min_new_tokens + the prompt's length when min_new_tokens is set
        "min_length": 0 if min_new else int(get("min_length") or 0),
        "min_new_tokens": min_new,
        "suppress_tokens": tuple(int(t) for t in get("suppress_tokens") or ()),
        "begin_suppress_tokens": tuple(int(t) for t in get("begin_suppress_tokens") or ()),
        "bad_words_ids": tuple(tuple(int(t) for t in seq) for seq in get("bad_words_ids") or ()),
        "sequence_bias": _sequence_bias(get("sequence_bias")),
        "forced_bos_token_id": get("forced_bos_token_id"),
        "forced_eos_token_id": tuple([forced_eos] if isinstance(forced_eos, int) else forced_eos or ()),
        "exponential_decay_length_penalty": (int(decay[0]), float(decay[1])) if decay else None,
        "remove_invalid_values": bool(get("remove_invalid_values")),
        "stop_strings": tuple([stops] if isinstance(stops, str) else stops or ()),
    }


def warper_settings(generation_config) -> dict:
    """The sampling filters after top-k and top-p a config sets (applied only to sampling rows, as generate()
    applies them only with do_sample)."""
    get = lambda name: setting(generation_config, name)  # noqa: E731
    typical, epsilon, eta = get("typical_p"), get("epsilon_cutoff"), get("eta_cutoff")
    return {
        "min_p": get("min_p"),
        "typical_p": typical if typical is not None and typical < 1.0 else None,
        "epsilon_cutoff": epsilon if epsilon is not None and 0.0 < epsilon < 1.0 else None,
        "eta_cutoff": eta if eta is not None and 0.0 < eta < 1.0 else None,
    }


def _sequence_bias(value) -> tuple:
    """generation_config.sequence_bias (a dict {tuple: bias} or a list [[ids, bias], ...]) as a tuple of pairs."""
    if not value:
        return ()
    pairs = value.items() if isinstance(value, dict) else value
    return tuple((tuple(int(t) for t in ids), float(bias)) for ids, bias in pairs)
