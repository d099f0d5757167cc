#!/usr/bin/env bash
# The Python environment of the `openai` backend's tests (tests/openai_server.rs)
# and of `leverflow bench openai`: a virtual environment with
# `transformers[serving]` (the `transformers serve` OpenAI-compatible server)
# and CPU torch. Idempotent: when the environment already holds the pinned
# versions it only says so (well under a second).
#
#   bash tools/serve_env.sh            # → $LEVERFLOW_SERVE_VENV, default ~/.cache/leverflow/serve-venv
#
# The environment lives outside the checkout (CI runs in a fresh clone), so it
# is made once per machine; pip's cache makes a remake quick.
set -euo pipefail

VENV="${LEVERFLOW_SERVE_VENV:-$HOME/.cache/leverflow/serve-venv}"
TORCH="torch==2.15.0 torchvision==0.29.2"
REST="transformers[serving]==5.25.0 pillow"
WANT="$TORCH $REST"
STAMP="$VENV/.leverflow-serve-env"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/transformers" ]; then
    echo "serve environment ready: $VENV"
    exit 0
fi

echo "making the serve environment in $VENV (a few minutes the first time)"
rm -f "$STAMP"
python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check --quiet)
# CPU torch: PyTorch's CPU wheel index where it is reachable (a small
# download), else the default index's wheel (it runs on the CPU as well).
# shellcheck disable=SC2086
if ! "${PIP[@]}" --retries 0 --timeout 20 --index-url https://download.pytorch.org/whl/cpu $TORCH 2>/dev/null; then
    echo "the CPU wheel index is not reachable; installing torch from the default index"
    # shellcheck disable=SC2086
    "${PIP[@]}" $TORCH
fi
# shellcheck disable=SC2086
"${PIP[@]}" $REST
"$VENV/bin/python" -c "import torch, torchvision, transformers, fastapi, uvicorn; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$WANT" > "$STAMP"
echo "serve environment ready: $VENV"
