#!/usr/bin/env bash
# Install Easel and its test tools into .venv, then run the test suite (offline, CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --upgrade pip
  .venv/bin/python -m pip install -r requirements-dev.txt
  touch "$stamp"
fi
# The browser tests drive Debian's chromium (playwright's own browser download needs hosts we cannot
# reach). Install it when we can; without it those tests are skipped, and say so.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y chromium >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1; }) \
      || echo "run_tests.sh: could not install chromium; browser tests will be skipped" >&2
  else
    echo "run_tests.sh: chromium missing (sudo apt-get install chromium); browser tests will be skipped" >&2
  fi
fi
# One torch thread: with another process on the second core, two threads ran 10-150x slower.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python -m pytest -q "$@"
