#!/usr/bin/env bash
# The test suite, offline: tiny random checkpoints are built on the fly; no model is downloaded.
#   bash scripts/test.sh [pytest args]           the tested versions (constraints.txt) in .venv
#   bash scripts/test.sh --latest [pytest args]  the newest versions pyproject.toml allows, in .venv-latest: run it
#                                                before moving constraints.txt (docs/dependencies.md)
if [ "${1:-}" = --latest ]; then
  shift
  export VLCACHE_LOCK=0
fi
source "$(dirname "$0")/venv.sh" test
if [ "${VLCACHE_LOCK:-1}" = 0 ]; then
  echo "testing with the newest allowed versions:" >&2
  python -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|transformers|tokenizers|safetensors|huggingface.hub|fastapi|starlette|uvicorn|av|pillow) " >&2
fi
export HF_HUB_OFFLINE=1
exec python -m pytest -q "$@"
