#!/usr/bin/env bash
# Set up Easel's virtual environment (first run, or when requirements change) and start it.
#   bash webui.sh [app.py flags...]             e.g. bash webui.sh generate --prompt "a red star"
#   EASEL_REQUIREMENTS=requirements-dev.txt bash webui.sh ...   (also installs the test tools)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${EASEL_REQUIREMENTS:-requirements.txt}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt "$REQUIREMENTS" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --upgrade pip >&2
  .venv/bin/python -m pip install -r "$REQUIREMENTS" >&2
  touch "$stamp"
fi
# No calls home from gradio (analytics, version checks).
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python app.py "$@"
