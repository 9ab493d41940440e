#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it first if needed.
#
#   bash scripts/env.sh COMMAND [ARGS...]        # e.g. bash scripts/env.sh deepspeed launchers/pretrain.py
#
# The command runs in the caller's working directory (relative paths such as --config my.yaml are
# the caller's). The environment lives outside the clone and needs about 6 GB (torch with its CUDA
# libraries, DeepSpeed, the rest); needs only python3 (>= 3.10) with venv and pip.
#
#   MATS_CACHE   where environments are kept (default ${XDG_CACHE_HOME:-~/.cache}/mats-scale); each is
#                keyed by the hash of pyproject.toml and the Python version, so fresh clones reuse it
#                and a dependency change builds a new one.
#   MATS_VENV    use exactly this environment instead. If it does not exist it is created there; an
#                existing environment that env.sh did not create (your conda env, a venv with a
#                specific CUDA build of torch) is used as it is: this checkout is installed into it
#                (pip install -e ".[test]", which adds only what is missing) and it is never deleted.
#   PYTHON       the interpreter that creates a new environment (default python3).
#
# Your own environment without this script: activate it, `pip install -e ".[test]"` once (install
# the torch build you want first), then run the commands directly.
#
# This checkout is installed in editable mode; when the environment was last used by another clone
# it is re-pointed here (checked from outside the checkout, so the local copy cannot hide it).
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
PIP=(-m pip install --quiet --disable-pip-version-check)

# Which checkout does the environment's `import mats_scale` load? Run isolated (-I: no current
# directory, no PYTHONPATH, no user site) from /, so a mats_scale folder next to the caller is never
# what answers.
installed_root() {
  (cd / && "$VENV/bin/python" -I -c \
    "import mats_scale, os; print(os.path.dirname(os.path.dirname(os.path.realpath(mats_scale.__file__))))" \
    2>/dev/null) || true
}

setup() {
  if [ -x "$VENV/bin/python" ] && [ ! -f "$VENV/.mats-scale-created" ] && [ ! -f "$VENV/.complete" ]; then
    # Somebody's own environment (MATS_VENV): install into it, never recreate it.
    if [ "$(installed_root)" != "$(realpath "$ROOT")" ]; then
      echo "[env] installing this checkout into $VENV (pip install -e \"$ROOT[test]\")" >&2
      (cd / && "$VENV/bin/python" "${PIP[@]}" -e "$ROOT[test]")
    fi
    return
  fi
  if [ ! -f "$VENV/.complete" ]; then
    echo "[env] creating $VENV (first run: downloads torch and friends, about 6 GB, a few minutes)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    touch "$VENV/.mats-scale-created"
    (cd / && "$VENV/bin/python" "${PIP[@]}" -e "$ROOT[test]")
    touch "$VENV/.complete"
  fi
  if [ "$(installed_root)" != "$(realpath "$ROOT")" ]; then
    echo "[env] pointing $VENV at this checkout ($ROOT)" >&2
    (cd / && "$VENV/bin/python" "${PIP[@]}" --no-deps -e "$ROOT")
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
exec "$@"
