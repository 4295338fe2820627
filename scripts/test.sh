#!/usr/bin/env bash
# The test suite, offline: a tiny random Qwen3-VL checkpoint is built on the fly; no model is downloaded.
source "$(dirname "$0")/venv.sh" test
export HF_HUB_OFFLINE=1
exec python -m pytest -q "$@"
