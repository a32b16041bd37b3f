#!/usr/bin/env bash
# The test command (README): the whole suite, offline, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False GRADIO_SSR_MODE=False \
       NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost TOKENIZERS_PARALLELISM=false
# The browser suite must run here: a missing Chromium fails the run instead of skipping it.
export REQUIRE_BROWSER="${REQUIRE_BROWSER:-1}"
exec python -m pytest -q -p no:cacheprovider --timeout 900 "$@" tests
