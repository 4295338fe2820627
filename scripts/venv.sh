# Sourced by the README's commands: make .venv with vlcache installed (once; delete .venv to reinstall).
# $1: the pip extra to install ("" or "test").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extra="${1:-}"
stamp=".venv/.installed${extra:+-$extra}"
fresh() { [ -f "$1" ] && [ "$1" -nt pyproject.toml ]; }
if ! fresh "$stamp" && ! fresh .venv/.installed-test; then  # the test install is a superset
  echo "setting up .venv (first run: installs torch, transformers and friends)..." >&2
  [ -x .venv/bin/python ] || python3 -m venv .venv
  quiet() { grep -v "^WARNING: Location .* is ignored" >&2 || true; }  # this machine's pip config is noisy
  .venv/bin/python -m pip install -q -e ".${extra:+[$extra]}" 2>&1 | quiet
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
