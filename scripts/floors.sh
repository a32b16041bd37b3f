#!/usr/bin/env bash
# The floors check: a clean venv (in a temp folder, removed after) with torch 2.13.0 and, of every other runtime
# requirement, the lowest version requirements.txt allows (`name>=X` -> `name==X`, passed to pip as a
# constraints file), then tests/test_floors.py: a short train + export + generate on tiny-sdxl. pip uses its own
# configured index. gradio is left out: the check covers the trainer and the Generate engine, not the app.
# Usage: bash scripts/floors.sh   (FLOORS_KEEP=DIR keeps the venv in DIR and reuses it on the next run)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
start=$(date +%s)
if [ -n "${FLOORS_KEEP:-}" ]; then
  work="$FLOORS_KEEP"; mkdir -p "$work"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/floors.XXXXXX"); trap 'rm -rf "$work"' EXIT
fi
[ -x "$work/venv/bin/python" ] || python -m venv "$work/venv"
py="$work/venv/bin/python"
# The floors: every `name>=X` line of requirements.txt but torch (installed as the pinned wheel) and gradio.
"$py" - requirements.txt > "$work/floors.txt" <<'PY'
import re, sys
for line in open(sys.argv[1], encoding="utf-8"):
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;#\s]*)", line)
    if m and m.group(1).lower() not in ("torch", "gradio"):
        print(f"{m.group(1)}=={m.group(2)}")
PY
grep -v -i '^gradio' requirements.txt > "$work/requirements.txt"
echo "floors: $(tr '\n' ' ' < "$work/floors.txt")"
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -r "$work/requirements.txt" "pytest>=8" "pytest-timeout>=2.3" -c "$work/floors.txt"
installed=$(date +%s)
echo "floors: venv ready in $((installed - start)) s"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false LORA_STUDIO_FLOORS=1
# its own tiny-model cache: the models are built by the floor versions themselves
export LORA_STUDIO_CACHE="$work/cache"
"$py" -m pytest -q -p no:cacheprovider --timeout 900 -m floors -rs tests/test_floors.py
echo "floors: install $((installed - start)) s, tests $(( $(date +%s) - installed )) s"
