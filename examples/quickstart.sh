#!/usr/bin/env bash
# Cache a photograph once, then ask it the guide's three questions from the cache.
# Model: $VLCACHE_MODEL (a hub id or a local folder), default Qwen/Qwen3-VL-2B-Instruct (downloaded on first use).
source "$(dirname "$0")/../scripts/venv.sh"
image="${1:-examples/rocket.jpg}"
cache="${VLCACHE_QUICKSTART_CACHE:-examples/rocket_cache.pt}"
python scripts/save_embeddings.py --image "$image" --output "$cache" --system-prompt "You are analyzing this image."
for question in "What objects are visible in this image?" "What colors dominate the scene?" "Describe the lighting and mood."; do
  echo "Q: $question"
  python scripts/run_smart_prompt.py --cache "$cache" --prompt "$question" --max_new_tokens 128
done
