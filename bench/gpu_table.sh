#!/usr/bin/env bash
# The GPU table of issue #16 in one call (bench/README.md, "GPU table"): installs the carried wheels, then runs
# bench/gpu_table.py, which builds the real SDXL architecture with random weights on the GPU and prints the
# table last. Aimed at under 8 minutes on one H100/H200 with a stock PyTorch.
#
#   bash bench/gpu_table.sh --reference .ref/diffusers [--wheels .whl] [--out DIR] [gpu_table.py options]
#   bash bench/gpu_table.sh --dry-run [--reference PATH]     # CPU, tiny sizes (tests/test_gpu_table.py)
#   bash bench/gpu_table.sh --wheels DIR --install-only      # only the install, and what it put first on the path
#
# --wheels DIR: wheels from bench/gpu_wheels.sh, installed with pip --no-index --no-deps into a folder put first
# on PYTHONPATH (default: .whl when it holds wheels, else the installed packages; a dry run installs none unless
# --wheels is given).
# --out DIR: table.md, results.json, stdout.log and stderr.log (default $OUT, else gpu-table-out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=""
OUTDIR=${OUT:-gpu-table-out}
DRY=0
INSTALL_ONLY=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --dry-run) DRY=1; ARGS+=("$1"); shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ -z "$WHEELS" ] && [ "$DRY" = 0 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    WHEELS=.whl
  else
    echo "# no wheels in .whl: using the installed packages"
  fi
fi
mkdir -p "$OUTDIR"
start=$(date +%s)
if [ -n "$WHEELS" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_table: no wheels in $WHEELS (make them with: bash bench/gpu_wheels.sh $WHEELS)" >&2
    exit 2
  fi
  SITE=${GPU_TABLE_SITE:-/tmp/gpu-table-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "# installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS in $(( $(date +%s) - start )) s"
fi
if [ "$INSTALL_ONLY" = 1 ]; then
  # what Python now imports first: each carried wheel's distribution, its version and where it comes from
  "$PY" - "$WHEELS" <<'PY'
import glob, importlib.metadata as md, os, sys
for whl in sorted(glob.glob(os.path.join(sys.argv[1] or ".whl", "*.whl"))):
    name = os.path.basename(whl).split("-")[0]
    dist = md.distribution(name)
    print(f"# {name} {dist.version} from {dist.locate_file('')}")
PY
  exit 0
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$DRY" = 0 ]; then
  # the random-weight model (7 GB) is built where there is room, not in the repository copy
  export LORA_STUDIO_CACHE=${LORA_STUDIO_CACHE:-/tmp/lora-studio-cache}
fi
set +e
"$PY" bench/gpu_table.py --out "$OUTDIR" "${ARGS[@]}" 2>"$OUTDIR/stderr.log" | tee "$OUTDIR/stdout.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
  echo "# gpu_table.py exited $rc; the end of its stderr ($OUTDIR/stderr.log):"
  tail -n 40 "$OUTDIR/stderr.log"
fi
echo "# gpu_table.sh: $(( $(date +%s) - start )) s in all"
exit "$rc"
