"""Defaults shared by the library and the CLI (kept free of heavy imports so the CLI parses fast)."""

DEFAULT_MODEL = "Qwen/Qwen3-VL-2B-Instruct"
MODEL_ENV_VAR = "VLCACHE_MODEL"  # points every command at a local model folder (or another hub id)
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant analyzing an image."  # the guide's default
DEFAULT_MAX_NEW_TOKENS = 128
