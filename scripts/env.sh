#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it first if needed.
#
#   bash scripts/env.sh COMMAND [ARGS...]
#
# The environment lives outside the clone, in $MATS_CACHE (default ~/.cache/mats-scale), keyed by the
# hash of pyproject.toml and the Python version, so fresh clones reuse it and a dependency change
# builds a new one. This checkout is installed into it in editable mode (re-pointed when the
# environment was last used by another clone). Needs only python3 (>= 3.10) with venv and pip.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
CACHE=${MATS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mats-scale}
KEY=$("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import hashlib, sys
h = hashlib.sha256(open(sys.argv[1], "rb").read())
h.update(sys.version.split()[0].encode())
print(h.hexdigest()[:16])
PYEOF
)
VENV=${MATS_VENV:-$CACHE/venv-$KEY}
mkdir -p "$CACHE"

setup() {
  if [ ! -f "$VENV/.complete" ]; then
    echo "[env] creating $VENV (first run: downloads torch and friends, a few minutes)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
    touch "$VENV/.complete"
  fi
  # Editable install pointing at this checkout?
  if ! "$VENV/bin/python" -c "import mats_scale, os, sys; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(mats_scale.__file__))) != sys.argv[1])" "$ROOT" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
  fi
}

if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.lock-$KEY"
  flock 9
  setup
  flock -u 9
else
  setup
fi

export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
# DeepSpeed JIT-compiles its ops once; keep them with the environment.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
cd "$ROOT"
exec "$@"
