# Sourced by the README's commands: make a virtual environment with vlcache installed (once; delete it to
# reinstall) and put it first on PATH.
# $1: the pip extra to install ("" or "test").
# VLCACHE_LOCK=0: install the newest versions pyproject.toml allows, into .venv-latest, instead of the tested
# versions of constraints.txt into .venv (scripts/test.sh --latest; see docs/dependencies.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extra="${1:-}"
if [ "${VLCACHE_LOCK:-1}" = 0 ]; then
  venv=.venv-latest lock=()
else
  venv=.venv lock=(-c constraints.txt)  # every direct and transitive dependency at the version the suite passed with
fi
stamp="$venv/.installed${extra:+-$extra}"
fresh() { [ -f "$1" ] && [ "$1" -nt pyproject.toml ] && [ "$1" -nt constraints.txt ]; }
if ! fresh "$stamp" && ! fresh "$venv/.installed-test"; then  # the test install is a superset
  if [ -x "$venv/bin/python" ]; then
    echo "updating $venv (pyproject.toml or constraints.txt changed since it was installed)..." >&2
  else
    echo "setting up $venv (first run: installs torch, transformers and friends, a few minutes)..." >&2
    python3 -m venv "$venv"
  fi
  # pip's own progress lines (what it fetches and installs), not its "already satisfied" ones nor this machine's
  # noisy config warnings; the whole output is kept in $venv/pip.log.
  set +e
  "$venv/bin/python" -m pip install --progress-bar off "${lock[@]}" -e ".${extra:+[$extra]}" 2>&1 | tee "$venv/pip.log" \
    | { grep --line-buffered -E "^(Collecting|Successfully installed|ERROR)" || true; } >&2
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" = 0 ] || { echo "error: installing into $venv failed (pip's output: $venv/pip.log)" >&2; exit 1; }
  touch "$stamp"
fi
export PATH="$PWD/$venv/bin:$PATH"
