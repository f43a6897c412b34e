#!/usr/bin/env bash
# Checks statehost on a machine with an NVIDIA GPU and JAX with CUDA; prints one table.
#
# Usage, from the repository root:   deploy/gpu-check.sh
#
# - Python packages the image lacks (fastapi, uvicorn, pydantic, ...) may be carried as
#   wheels in ./.whl (or $WHEELS); they are installed into a private folder, not the system.
# - If statehost is not installed, the working tree is staged as a package (statehost,
#   statehost.client <- client/, statehost.server <- server/), as pip would lay it out.
# - What it checks: see deploy/gpu_check.py. The table also goes to $OUT/gpu-check.txt when
#   $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Several processes share the GPU here (server, example, benchmark): no 75% preallocation each.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
    site=$(mktemp -d /tmp/statehost-site.XXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import statehost.server, statehost.client" 2> /dev/null; then
    stage=$(mktemp -d /tmp/statehost-pkg.XXXX)
    cp -r statehost "$stage/statehost"
    cp -r client "$stage/statehost/client"
    cp -r server "$stage/statehost/server"
    export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ -n "${OUT:-}" ]; then
    "$PY" deploy/gpu_check.py 2>&1 | tee "$OUT/gpu-check.txt"
    exit "${PIPESTATUS[0]}"
fi
exec "$PY" deploy/gpu_check.py
