#!/usr/bin/env bash
# Downloads the wheels bench/gpu_table.sh installs on a GPU machine that cannot reach a package index
# (Python 3.12, x86-64 manylinux, CUDA 13 / torch 2.11 there): exactly the versions of constraints.txt for what
# that machine lacks or holds at another version, and bitsandbytes (GPU only, so not in constraints.txt).
#
#   bash bench/gpu_wheels.sh [DEST]        # DEST defaults to .whl (ignored by .gitignore; carry it)
#
# Left out on purpose: huggingface_hub (the machine's 1.33 meets transformers' >=1.31 and diffusers' >=1.32;
# our pin 2.4 would also need httpx2), tokenizers (its 0.23.2 meets transformers' >=0.23.1), datasets (the
# trainer imports it only for Hub datasets, the reference script only with --dataset_name), torch, torchvision,
# accelerate and safetensors (there at the pinned versions or a torch-matched build).
#
# bitsandbytes' wheel is 41 MiB, most of it one library per CUDA version; the device run carries at most
# 64 MiB in all, so its copy keeps only the libraries for CUDA ${BNB_CUDA:-130} (and the CPU one) and is renamed
# with the build tag 0cuda<versions> so it cannot be taken for the published file. BNB_FULL=1 keeps the
# original (then carry it in a second call: see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
BNB_VERSION=${BNB_VERSION:-0.50.2}   # the first releases with libbitsandbytes_cuda130 (CUDA 13) are 0.48+
BNB_CUDA=${BNB_CUDA:-130}
FROM_CONSTRAINTS=(diffusers transformers peft prodigyopt regex)
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
for name in "${FROM_CONSTRAINTS[@]}"; do
  spec=$(grep -i "^${name}==" constraints.txt | head -n 1 || true)
  if [ -z "$spec" ]; then
    echo "gpu_wheels: $name is not pinned in constraints.txt" >&2
    exit 1
  fi
  "$PY" -m pip download -q "${PLATFORM[@]}" -d "$DEST" "$spec"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q "${PLATFORM[@]}" -d "$tmp" "bitsandbytes==${BNB_VERSION}"
if [ "${BNB_FULL:-0}" = 1 ]; then
  mv "$tmp"/bitsandbytes-*.whl "$DEST"/
else
  "$PY" - "$tmp" "$DEST" "$BNB_CUDA" <<'PY'
"""Copies the bitsandbytes wheel without the native libraries of other CUDA versions, ROCm and XPU; RECORD and
WHEEL are rewritten to match (pip installs a wheel by its RECORD)."""
import base64, csv, glob, hashlib, io, os, re, sys, zipfile

src_dir, dest, cudas = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
src = glob.glob(os.path.join(src_dir, "bitsandbytes-*.whl"))[0]
keep_libs = {f"libbitsandbytes_cuda{v}.so" for v in cudas} | {"libbitsandbytes_cpu.so"}
tag = "0cuda" + "_".join(cudas)
name, version, *rest = os.path.basename(src)[:-4].split("-")
out = os.path.join(dest, "-".join([name, version, tag] + rest[-3:]) + ".whl")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist()
             if not (re.search(r"/libbitsandbytes_[^/]+\.so$", n) and os.path.basename(n) not in keep_libs)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    wheel = next(n for n in names if n.endswith(".dist-info/WHEEL"))
    rows = []
    for n in names:
        if n == record:
            continue
        data = zin.read(n)
        if n == wheel:
            text = re.sub(r"(?m)^Build:.*\n", "", data.decode())
            data = (text.rstrip("\n") + f"\nBuild: {tag}\n").encode()
        zout.writestr(zin.getinfo(n), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append([n, f"sha256={digest}", str(len(data))])
    rows.append([record, "", ""])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    zout.writestr(record, buf.getvalue())
missing = keep_libs - {os.path.basename(n) for n in names}
if missing - {"libbitsandbytes_cpu.so"}:
    sys.exit(f"gpu_wheels: {os.path.basename(src)} has no {sorted(missing)}")
print(f"gpu_wheels: {os.path.basename(out)} keeps {sorted(keep_libs - missing)}")
PY
fi
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -n 1
